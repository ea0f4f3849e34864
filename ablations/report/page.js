// The report's interactions: draw each figure from its inlined spec with the inlined
// plotly.js (when it comes into view), sort the tables by a header click, filter the trials.
(function () {
  "use strict";
  var config = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

  function draw(el) {
    if (el.dataset.drawn) return el.drawing;
    el.dataset.drawn = "1";
    var spec = JSON.parse(document.getElementById(el.dataset.spec).textContent);
    el.drawing = window.Plotly.newPlot(el, spec.data, spec.layout, config);
    return el.drawing;
  }

  var plots = Array.prototype.slice.call(document.querySelectorAll("div.plot[data-spec]"));
  function drawAll() { return window.Plotly ? Promise.all(plots.map(draw)) : Promise.resolve(); }
  window.allconvReport = { drawAll: drawAll };
  if (!window.Plotly) {
    plots.forEach(function (el) {
      el.classList.add("failed");
      el.textContent = "This figure needs the page's inlined plotting script, which did not run.";
    });
  } else if ("IntersectionObserver" in window) {
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { seen.unobserve(e.target); draw(e.target); }
      });
    }, { rootMargin: "600px" });
    plots.forEach(function (el) { seen.observe(el); });
  } else {
    drawAll();
  }

  function key(td) {
    if (!td) return "";
    return td.hasAttribute("data-v") ? parseFloat(td.getAttribute("data-v")) : td.textContent;
  }
  document.querySelectorAll("table.sortable").forEach(function (t) {
    var heads = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.title = "sort";
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = t.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          var missing = (x === "–") - (y === "–");  // missing values last, either way
          if (missing) return missing;
          if (typeof x === "number" && typeof y === "number") return asc ? x - y : y - x;
          return asc ? String(x).localeCompare(String(y), undefined, { numeric: true })
                     : String(y).localeCompare(String(x), undefined, { numeric: true });
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  var table = document.getElementById("trials-table");
  var words = document.getElementById("trials-filter");
  var state = document.getElementById("trials-state");
  var count = document.getElementById("trials-count");
  function filter() {
    var want = words.value.toLowerCase().split(/\s+/).filter(Boolean);
    var only = state.value, shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      var text = r.textContent.toLowerCase();
      var ok = want.every(function (w) { return text.indexOf(w) >= 0; }) &&
        (!only || r.getAttribute("data-state") === only);
      r.hidden = !ok;
      shown += ok ? 1 : 0;
    });
    count.textContent = shown + " of " + table.tBodies[0].rows.length + " trials shown";
  }
  if (table && words && state) {
    words.addEventListener("input", filter);
    state.addEventListener("change", filter);
    filter();
  }
})();
