// The stella dashboard: fetches status.json (with the token of the page's address, when
// there is one) every 5 s and draws it. Every value from the store goes in as text
// (textContent, SVG text nodes), never as markup.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var ORDER = ["sent", "recorded", "queued", "skipped", "suppressed", "invalid", "failed"];
  var COLORS = { sent: "#2f9e44", recorded: "#94d82d", queued: "#4c6ef5", skipped: "#adb5bd",
                 suppressed: "#fab005", invalid: "#f76707", failed: "#e03131" };
  var params = new URLSearchParams(location.search);
  var token = params.get("token");
  var range = ["24h", "7d", "30d"].indexOf(location.hash.slice(1)) >= 0 ? location.hash.slice(1) : "24h";
  var last = null, timer = null;

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function setK(key, value) {
    var list = document.querySelectorAll('[data-k="' + key + '"]');
    for (var i = 0; i < list.length; i++) list[i].textContent = String(value);
  }
  function pct(x) { return (x * 100).toFixed(1) + "%"; }
  function pad(n) { return n < 10 ? "0" + n : "" + n; }
  function when(t) {
    if (t === null || t === undefined) return "–";
    var d = new Date(t * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
           pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function ago(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 90) return seconds + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 129600) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " days";
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // Outcomes per bucket, stacked by status.
  function drawOutcomes(s) {
    var box = $("outcomes-chart");
    clear(box);
    var bucket = s.bucket, first = Math.floor(s.since / bucket) * bucket;
    var n = Math.floor((s.now - first) / bucket) + 1;
    var per = {}, max = 0;
    s.timeline.forEach(function (g) {
      var b = per[g.start] || (per[g.start] = { total: 0 });
      b[g.status] = (b[g.status] || 0) + g.count;
      b.total += g.count;
      if (b.total > max) max = b.total;
    });
    var W = 1000, H = 240, L = 44, R = 8, T = 10, B = 26;
    var pw = W - L - R, ph = H - T - B, bw = pw / n;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "Outcomes per " + (bucket === 3600 ? "hour" : "day") });
    var top = niceMax(max);
    for (var g = 0; g <= 4; g++) {
      var y = T + ph - ph * g / 4;
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, "class": "grid-line" }));
      root.appendChild(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, Math.round(top * g / 4)));
    }
    var every = Math.ceil(n / 12);
    for (var i = 0; i < n; i++) {
      var start = first + i * bucket, b = per[start], x = L + i * bw;
      if (b) {
        var acc = 0, tip = [];
        ORDER.forEach(function (st) {
          var c = b[st] || 0;
          if (!c) return;
          var h = ph * c / top, yy = T + ph - ph * acc / top - h;
          root.appendChild(svg("rect", { x: x + bw * 0.12, y: yy, width: Math.max(1, bw * 0.76), height: h,
                                          fill: COLORS[st], rx: Math.min(3, bw * 0.1) }));
          acc += c;
          tip.push(st + " " + c);
        });
        var hit = svg("rect", { x: x, y: T, width: bw, height: ph, fill: "transparent" });
        hit.appendChild(svg("title", {}, label(start, bucket, true) + ": " + tip.join(", ")));
        root.appendChild(hit);
      }
      if (i % every === 0) {
        root.appendChild(svg("text", { x: x + bw / 2, y: H - 8, "text-anchor": "middle" }, label(start, bucket, false)));
      }
    }
    box.appendChild(root);
    var legend = $("legend");
    clear(legend);
    var totals = {};
    s.counts.forEach(function (c) { totals[c.status] = (totals[c.status] || 0) + c.count; });
    ORDER.forEach(function (st) {
      var li = el("li");
      li.appendChild(el("span", { "class": "sw", style: "background:" + COLORS[st] }));
      li.appendChild(document.createTextNode(st + " "));
      li.appendChild(el("b", {}, totals[st] || 0));
      legend.appendChild(li);
    });
    if (max === 0) box.appendChild(el("p", { "class": "empty" }, "No events in this range."));
  }

  function niceMax(v) {
    if (v <= 4) return 4;
    var p = Math.pow(10, Math.floor(Math.log(v) / Math.LN10));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function label(start, bucket, long) {
    var d = new Date(start * 1000);
    var day = pad(d.getMonth() + 1) + "-" + pad(d.getDate());
    if (bucket >= 86400) return day;
    return (long ? day + " " : "") + pad(d.getHours()) + ":00";
  }

  // The error rate of each hour against the threshold.
  function drawRate(s) {
    var box = $("rate-chart");
    clear(box);
    var first = Math.floor(s.since / 3600) * 3600, n = Math.floor((s.now - first) / 3600) + 1;
    var byStart = {}, max = s.threshold * 2;
    s.rate.forEach(function (r) { byStart[r.start] = r; if (r.rate > max) max = r.rate; });
    max = Math.min(1, Math.max(max, 0.02));
    var W = 1000, H = 170, L = 44, R = 8, T = 12, B = 24, pw = W - L - R, ph = H - T - B, bw = pw / n;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "Error rate per hour" });
    for (var g = 0; g <= 2; g++) {
      var y = T + ph - ph * g / 2;
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, "class": "grid-line" }));
      root.appendChild(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, pct(max * g / 2)));
    }
    var every = Math.ceil(n / 12);
    for (var i = 0; i < n; i++) {
      var start = first + i * 3600, r = byStart[start], x = L + i * bw;
      if (r && r.total > 0) {
        var h = Math.max(r.errors > 0 ? 2 : 1, ph * r.rate / max);
        var bar = svg("rect", { x: x + bw * 0.15, y: T + ph - h, width: Math.max(1, bw * 0.7), height: h, rx: Math.min(3, bw * 0.1),
                                fill: r.rate > s.threshold ? "#e03131" : "#51cf66", "data-rate": r.rate });
        bar.appendChild(svg("title", {}, label(start, 3600, true) + ": " + r.errors + " of " + r.total + " (" + pct(r.rate) + ")"));
        root.appendChild(bar);
      }
      if (i % every === 0) {   // over days: the date, not the hour
        root.appendChild(svg("text", { x: x + bw / 2, y: H - 7, "text-anchor": "middle" }, label(start, n > 36 ? 86400 : 3600, false)));
      }
    }
    var ty = T + ph - ph * s.threshold / max;
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: ty, y2: ty, "class": "threshold" }));
    root.appendChild(svg("text", { x: L + 6, y: ty - 5, "class": "threshold-label" },
                         "alert threshold " + pct(s.threshold)));
    box.appendChild(root);
  }

  function drawOutbox(s) {
    var o = s.outbox;
    ["queued", "due", "scheduled", "retrying", "in_flight", "dead"].forEach(function (k) { setK("outbox." + k, o[k]); });
    $("oldest").textContent = o.oldest === null ? "Nothing queued." :
      "The oldest queued request was created " + ago(s.now - o.oldest) + " ago (" + when(o.oldest) + ").";
    $("next-due").textContent = o.next_due === null ? (o.due > 0 ? "Some are due now: run stella retry." : "") :
      "The next is due " + when(o.next_due) + ", in " + ago(o.next_due - s.now) + "." +
      (o.next_scheduled !== null ? " The next scheduled one: " + when(o.next_scheduled) + "." : "");
    var depth = $("depth");
    clear(depth);
    var total = o.queued + o.dead;
    [["due", "#fab005"], ["scheduled", "#4c6ef5"], ["retrying", "#f76707"], ["in_flight", "#15aabf"], ["dead", "#e03131"]]
      .forEach(function (p) {
        if (o[p[0]] > 0) depth.appendChild(el("span", { style: "background:" + p[1] + ";width:" + (100 * o[p[0]] / total) + "%", title: p[0] }));
      });
  }

  // The work queue (a Redis store): its numbers, the workers, the dead-letter stream.
  function drawWorkers(s) {
    var box = $("workers");
    clear(box);
    $("queue").hidden = !s.queue;
    $("queue-dead-panel").hidden = !s.queue;
    if (s.workers === null) {
      box.appendChild(el("p", { "class": "empty", id: "no-workers" },
        "No workers (" + s.backend + " store): `stella trigger` sends in line, and `stella retry` sends the outbox once due."));
    }
    if (s.queue) {
      var q = s.queue;
      ["lag", "pending", "dead", "length"].forEach(function (k) { setK("queue." + k, q[k] === null ? "–" : q[k]); });
      $("queue-oldest").textContent = q.oldest === null ? "Nothing waiting." :
        "The oldest entry not done was added " + ago(s.now - q.oldest) + " ago (" + when(q.oldest) + ").";
      var body = $("queue-dead").tBodies[0];
      clear(body);
      (q.dead_letters || []).forEach(function (d) {
        var tr = el("tr", { "class": "row-qdead", "data-id": d.id });
        tr.appendChild(el("td", { "class": "time" }, when(d.time)));
        tr.appendChild(el("td", {}, d.entry === null || d.entry === "" ? "–" : d.entry));
        tr.appendChild(el("td", { "class": "num" }, d.deliveries === null ? "–" : d.deliveries));
        tr.appendChild(el("td", {}, d.worker === null || d.worker === "" ? "–" : d.worker));
        tr.appendChild(el("td", { "class": "msg" }, d.reason));
        body.appendChild(tr);
      });
      if (!(q.dead_letters || []).length) {
        body.appendChild(el("tr")).appendChild(el("td", { colspan: 5, "class": "empty" }, "None: every entry was processed."));
      }
    }
    if (!s.workers) return;
    if (s.workers.length === 0) { box.appendChild(el("p", { "class": "empty" }, "No worker has a heartbeat.")); return; }
    var table = el("table", { id: "worker-table" }), head = el("tr");
    ["worker", "state", "host", "heartbeat", "processed", "pending"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
    table.appendChild(el("thead")).appendChild(head);
    var tbody = table.appendChild(el("tbody"));
    s.workers.forEach(function (w) {
      var tr = el("tr", { "class": "row-worker", "data-worker": w.name, "data-state": w.state || "" });
      tr.appendChild(el("td", {}, w.name));
      tr.appendChild(el("td", { "class": "state state-" + (w.state || "unknown") }, w.state || (w.busy ? "live" : "–")));
      tr.appendChild(el("td", {}, (w.host || "") + (w.pid ? " (" + w.pid + ")" : "")));
      tr.appendChild(el("td", { "class": "time", "data-heartbeat": w.heartbeat || "", title: when(w.heartbeat) },
                        w.heartbeat ? ago(s.now - w.heartbeat) + " ago" : "–"));
      tr.appendChild(el("td", { "class": "num" }, w.processed === undefined || w.processed === null ? "–" : w.processed));
      tr.appendChild(el("td", { "class": "num" }, w.pending === undefined || w.pending === null ? "–" : w.pending));
      tbody.appendChild(tr);
    });
    box.appendChild(el("div", { "class": "scroll" })).appendChild(table);
  }

  function pill(status) {
    return el("span", { "class": "pill", style: "background:" + (COLORS[status] || "#868e96") }, status);
  }

  function drawTables(s) {
    var body = $("reasons").tBodies[0];
    clear(body);
    var max = 0;
    s.counts.forEach(function (c) { if (c.count > max) max = c.count; });
    var rows = s.counts.slice().sort(function (a, b) {
      return ORDER.indexOf(a.status) - ORDER.indexOf(b.status) || b.count - a.count;
    });
    rows.forEach(function (c) {
      var tr = el("tr", { "data-status": c.status });
      tr.appendChild(el("td")).appendChild(pill(c.status));
      tr.appendChild(el("td", {}, c.reason === null ? "–" : c.reason));
      tr.appendChild(el("td", { "class": "num" }, c.count));
      tr.appendChild(el("td")).appendChild(el("div", { "class": "hbar", style: "width:" + (100 * c.count / max) + "%;background:" + (COLORS[c.status] || "#868e96") }));
      body.appendChild(tr);
    });
    if (!rows.length) body.appendChild(el("tr")).appendChild(el("td", { colspan: 4, "class": "empty" }, "No events in this range."));

    body = $("dead").tBodies[0];
    clear(body);
    setK("dead.count", s.outbox.dead);
    s.dead.forEach(function (d) {
      var tr = el("tr", { "class": "row-dead" });
      tr.appendChild(el("td", { "class": "time" }, when(d.died_at)));
      tr.appendChild(el("td", {}, d.event_id === null ? "–" : d.event_id));
      tr.appendChild(el("td", {}, d.brand === null ? "–" : d.brand));
      tr.appendChild(el("td", { "class": "num" }, d.attempts === null ? "–" : d.attempts));
      tr.appendChild(el("td", { "class": "msg" }, d.error === null ? "" : d.error));
      body.appendChild(tr);
    });
    if (!s.dead.length) body.appendChild(el("tr")).appendChild(el("td", { colspan: 5, "class": "empty" }, "None: nothing was given up."));

    body = $("latest").tBodies[0];
    clear(body);
    setK("latest.count", s.latest.length);
    s.latest.forEach(function (e) {
      var tr = el("tr", { "class": "row-latest" });
      tr.appendChild(el("td", { "class": "time" }, when(e.time)));
      tr.appendChild(el("td")).appendChild(pill(e.status));
      tr.appendChild(el("td", { "class": "event" }, e.event_id === null ? "–" : e.event_id));
      tr.appendChild(el("td", {}, e.reason === null ? "–" : e.reason));
      tr.appendChild(el("td", { "class": "msg" }, (e.error_kind ? e.error_kind + ": " : "") + e.message));
      body.appendChild(tr);
    });
    if (!s.latest.length) body.appendChild(el("tr")).appendChild(el("td", { colspan: 5, "class": "empty" }, "None in this range."));
  }

  // An empty list may come as {} (Debian's lua-cjson 2.1.0 has no array_mt): a list either way.
  function lists(s) {
    function list(x) { return Array.isArray(x) ? x : []; }
    ["counts", "rate", "latest", "timeline", "dead"].forEach(function (k) { s[k] = list(s[k]); });
    if (s.workers) s.workers = list(s.workers);
    if (s.queue) ["consumers", "workers", "dead_letters"].forEach(function (k) { s.queue[k] = list(s.queue[k]); });
    return s;
  }

  function render(s) {
    s = lists(s);
    last = s;
    $("db").textContent = s.db;
    $("backend").textContent = s.backend;
    var totals = {};
    s.counts.forEach(function (c) { totals[c.status] = (totals[c.status] || 0) + c.count; });
    ORDER.forEach(function (st) { setK("count." + st, totals[st] || 0); });
    setK("total", s.total);
    setK("threshold", pct(s.threshold));
    var hour = Math.floor(s.now / 3600) * 3600, cur = null;
    s.rate.forEach(function (r) { if (r.start === hour) cur = r; });
    setK("rate.last", cur ? pct(cur.rate) : "–");
    setK("rate.last_counts", cur ? cur.errors + " of " + cur.total + " requests" : "no requests this hour");
    $("rate-card").className = "card " + (cur && cur.rate > s.threshold ? "over" : "ok");
    var banner = $("banner");
    var over = s.rate.filter(function (r) { return r.rate > s.threshold; });
    banner.hidden = !s.alert;
    if (s.alert) {
      var worst = over.reduce(function (a, b) { return b.rate > a.rate ? b : a; }, over[0]);
      banner.textContent = over.length + " hour" + (over.length === 1 ? "" : "s") + " above the alert threshold of " +
        pct(s.threshold) + " errors; the worst: " + label(worst.start, 3600, true) + ", " + worst.errors + " of " +
        worst.total + " (" + pct(worst.rate) + ").";
    }
    $("bucket-name").textContent = s.bucket === 3600 ? "hour" : "day";
    drawOutcomes(s);
    drawRate(s);
    drawOutbox(s);
    drawWorkers(s);
    drawTables(s);
    $("updated").textContent = "updated " + when(s.now).slice(11);
    $("live-dot").className = "dot";
    $("problem").hidden = true;
    document.documentElement.setAttribute("data-rendered", "1");
  }

  function url() {
    var u = "status.json?since=" + range;
    return token ? u + "&token=" + encodeURIComponent(token) : u;
  }

  function load() {
    var xhr = new XMLHttpRequest();
    xhr.open("GET", url());
    if (token) xhr.setRequestHeader("Authorization", "Bearer " + token);
    xhr.onload = function () {
      if (xhr.status === 200) {
        try { render(JSON.parse(xhr.responseText)); } catch (e) { fail("the data could not be shown: " + e.message); }
      } else {
        var msg = xhr.status;
        try { msg = xhr.status + ": " + JSON.parse(xhr.responseText).error; } catch (e) { /* not JSON */ }
        fail("status.json answered " + msg);
      }
    };
    xhr.onerror = function () { fail("the dashboard cannot be reached (stopped?)"); };
    xhr.send();
  }

  function fail(message) {
    var p = $("problem");
    p.textContent = message + (last ? "; showing the data of " + when(last.now) + "." : ".");
    p.hidden = false;
    $("live-dot").className = "dot stale";
  }

  var buttons = document.querySelectorAll("[data-range]");
  function mark() {
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].setAttribute("aria-pressed", buttons[i].getAttribute("data-range") === range ? "true" : "false");
    }
  }
  for (var i = 0; i < buttons.length; i++) {
    buttons[i].addEventListener("click", function (e) {
      range = e.currentTarget.getAttribute("data-range");
      if (history.replaceState) history.replaceState(null, "", location.search + "#" + range);
      mark();
      load();
    });
  }
  mark();
  $("json-link").setAttribute("href", url());
  load();
  timer = setInterval(load, 5000);
})();
