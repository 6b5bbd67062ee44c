// The theme's Font Awesome (SVG + JS) would replace every <i class="fa ..."> on the page with an <svg>,
// including the icons inside ipywidgets (Play, Button, ...). Those views keep a reference to their <i> and
// change its class later, so the Play widget threw "Cannot set properties of undefined (setting 'className')"
// and never played. Without the replacement every icon, the theme's and the widgets', is drawn by the icon
// fonts that the theme and the widget manager already ship, and nothing breaks.
// Runs before the theme's deferred fontawesome.js, which reads this global when it starts.
window.FontAwesomeConfig = Object.assign({}, window.FontAwesomeConfig, { autoReplaceSvg: false });
