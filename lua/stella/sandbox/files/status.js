// Tabs and auto-refresh for the sandbox's status page. Without JavaScript every panel
// shows, one under the other.
(function () {
  "use strict";
  var root = document.documentElement;
  root.className += " js";
  var buttons = Array.prototype.slice.call(document.querySelectorAll('[role="tab"]'));
  var names = buttons.map(function (b) { return b.getAttribute("data-tab"); });

  function show(name, focus) {
    if (names.indexOf(name) < 0) name = names[0];
    buttons.forEach(function (b) {
      var on = b.getAttribute("data-tab") === name;
      b.setAttribute("aria-selected", on ? "true" : "false");
      b.tabIndex = on ? 0 : -1;
      var panel = document.getElementById(b.getAttribute("aria-controls"));
      if (panel) panel.hidden = !on;
      if (on && focus) b.focus();
    });
    root.setAttribute("data-tab", name);
  }

  buttons.forEach(function (b, i) {
    b.addEventListener("click", function () {
      var name = b.getAttribute("data-tab");
      if (history.replaceState) history.replaceState(null, "", "#" + name);
      show(name);
    });
    b.addEventListener("keydown", function (e) {
      var step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      e.preventDefault();
      var next = buttons[(i + step + buttons.length) % buttons.length];
      next.click();
      next.focus();
    });
  });
  window.addEventListener("hashchange", function () { show(location.hash.slice(1)); });
  show(location.hash.slice(1));

  // Refresh every 5 s while the box is ticked (remembered for this tab of the browser).
  var box = document.getElementById("auto-refresh");
  var KEY = "stella-sandbox-refresh";
  var timer = null;
  function store(on) { try { sessionStorage.setItem(KEY, on ? "1" : ""); } catch (e) { /* private mode */ } }
  function stored() { try { return sessionStorage.getItem(KEY) === "1"; } catch (e) { return false; } }
  function arm() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (box && box.checked) timer = setTimeout(function () { location.reload(); }, 5000);
  }
  if (box) {
    box.checked = stored();
    box.addEventListener("change", function () { store(box.checked); arm(); });
    arm();
  }
})();
