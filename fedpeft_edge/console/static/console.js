// fedpeft-edge console: keeps an open page current without a framework. The server renders every text
// (in the page's language); this only swaps the page body every few seconds, runs the deadline
// countdown, and asks before irreversible actions. The page works without it, just without refreshing.
(function () {
  "use strict";
  var offset = 0; // server clock minus this browser's clock, in seconds

  function countdown() {
    var el = document.getElementById("countdown");
    if (!el || el.dataset.paused === "1") return;
    var left = Math.floor(parseFloat(el.dataset.deadline) - (Date.now() / 1000 + offset));
    if (left <= 0) { el.textContent = el.dataset.passed; return; }
    var m = Math.floor(left / 60), s = left % 60;
    el.textContent = m + ":" + (s < 10 ? "0" : "") + s;
  }

  function syncClock() {
    var el = document.getElementById("countdown");
    if (el && el.dataset.now) offset = parseFloat(el.dataset.now) - Date.now() / 1000;
  }

  function refresh() {
    var main = document.getElementById("content");
    if (!main || document.hidden) return;
    var url = window.location.pathname + "?partial=1" +
      (window.location.search ? "&" + window.location.search.substring(1) : "");
    fetch(url, { credentials: "same-origin", redirect: "manual" }).then(function (r) {
      if (r.type === "opaqueredirect" || r.status === 401 || r.status === 303) {
        window.location.reload(); // the session ended: the server sends the login page
        return null;
      }
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html === null || html === undefined) return;
      main.innerHTML = html;
      syncClock();
      countdown();
    }).catch(function () { /* the broker or the console is restarting: try again next time */ });
  }

  document.addEventListener("submit", function (ev) {
    var button = ev.submitter || ev.target.querySelector("button[data-confirm]");
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) ev.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    syncClock();
    countdown();
    setInterval(countdown, 1000);
    var every = parseFloat(document.body.dataset.refresh || "0");
    if (every > 0) setInterval(refresh, every * 1000);
  });
})();
