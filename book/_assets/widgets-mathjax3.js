// The ipywidgets HTML manager (html-manager 1.x) typesets widget labels with the MathJax 2 call
// `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`. The book loads MathJax 3, which has no `Hub`, so
// every widget label threw "Cannot read properties of undefined (reading 'Queue')". Translate the call.
// Loaded with `defer` after MathJax's own deferred script, so `window.MathJax` is MathJax 3 by now.
(function () {
  var mj = window.MathJax;
  if (!mj || mj.Hub || !mj.startup) return;
  mj.Hub = {
    Queue: function (command) {
      var element = command && command[2];
      mj.startup.promise
        .then(function () { return mj.typesetPromise(element ? [element] : undefined); })
        .catch(function (err) { console.warn("MathJax could not typeset a widget label", err); });
    },
  };
})();
