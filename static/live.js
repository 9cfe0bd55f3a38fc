// The live indicator, and polling while the page has no live socket.
//
// The socket element (#live) names the indicator's id in data-status.
//
// The server swaps in "live" with each snapshot. When the socket drops, the
// indicator says "reconnecting…" while htmx's hx-ws reconnects; if the page
// is not live again within POLL_AFTER ms, or the server refused the socket
// because it is full (close code 1013), it says "not live (polling)" and
// fetches the page's fragments every POLL_EVERY ms with a plain GET of the
// socket's own URL (the same fragments the socket would push) until a
// socket is accepted again.
(function () {
  var RECONNECTS = [1001, 1005, 1006, 1011, 1012, 1014];  // hx-ws retries these
  var FULL = 1013;          // the server has no room: try again later
  var REFUSED = 1008;       // policy: the socket is refused, with the reason
  var POLL_AFTER = 3000;    // ms without a live socket before polling starts
  var POLL_EVERY = 5000;    // ms between polls
  var RETRY_FULL = [5000, 10000, 20000, 30000];  // ms before asking a full server again

  var live = false, polling = null, fallback = null, refusals = 0, allowNext = false;

  function show(text, on) {
    var el = socketElement();
    var status = el && document.getElementById(el.getAttribute('data-status'));
    if (!status) return;
    status.className = 'live ' + (on ? 'live-on' : 'live-off');
    status.textContent = text;
  }

  function socketElement() { return document.getElementById('live'); }

  function poll() {
    polling = setTimeout(poll, POLL_EVERY);
    var el = socketElement();
    if (live || !el || document.hidden) return;
    fetch(el.getAttribute('hx-ws:connect'), {cache: 'no-store', headers: {'Accept': 'text/html'}})
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        // The same swap hx-ws makes with a pushed message: each <hx-partial>
        // replaces the element it names.
        if (text && !live) htmx.swap({sourceElement: el, target: el, swap: 'none swapEmpty:false', text: text});
      })
      .catch(function () { /* the server is away: the next poll tries again */ });
  }

  function startPolling() {
    clearTimeout(fallback);
    show('not live (polling)', false);
    if (polling === null) poll();
  }

  function stopPolling() {
    clearTimeout(polling);
    clearTimeout(fallback);
    polling = null;
  }

  function armFallback() {
    clearTimeout(fallback);
    fallback = setTimeout(function () { if (!live) startPolling(); }, POLL_AFTER);
  }

  // A fresh copy of the socket element: hx-ws connects it as on page load.
  function reconnect() {
    var el = socketElement();
    if (!el) return;
    allowNext = true;
    var copy = el.cloneNode(false);
    el.replaceWith(copy);
    htmx.process(copy);
  }

  document.addEventListener('htmx:ws:after:message:incoming', function () {
    live = true;
    refusals = 0;
    stopPolling();
  });

  document.addEventListener('htmx:ws:before:connection', function (event) {
    // After a refusal hx-ws would ask again within a second (the refused
    // socket did open); wait longer instead, and reconnect ourselves.
    if (allowNext || refusals === 0) { allowNext = false; return; }
    event.detail.connection.cancelled = true;
    var delay = RETRY_FULL[Math.min(refusals, RETRY_FULL.length) - 1];
    setTimeout(reconnect, delay * (0.7 + 0.6 * Math.random()));
  });

  document.addEventListener('htmx:ws:close', function (event) {
    var detail = event.detail || {};
    if (detail.reason === 'cancelled') return;  // our own wait after a refusal
    live = false;
    if (detail.code === FULL) {
      refusals += 1;
      startPolling();
    } else if (detail.code === REFUSED) {
      // Refused for good (logged out, a bad view, another site): say why.
      stopPolling();
      show('not live: ' + (detail.reason || 'refused') + ' (reload)', false);
    } else if (detail.code === null || RECONNECTS.indexOf(detail.code) >= 0) {
      if (polling === null) show('reconnecting…', false);
      armFallback();
    } else {
      stopPolling();
      show('offline: reload to refresh', false);
    }
  });

  document.addEventListener('htmx:ws:error', function () {
    live = false;
    if (polling === null) show('reconnecting…', false);
    armFallback();
  });

  // A socket that never opens (no server, a proxy without WebSockets)
  // raises no close with a code we can act on in every browser: poll if the
  // page is not live shortly after it loads.
  document.addEventListener('DOMContentLoaded', function () {
    if (socketElement()) armFallback();
  });
})();
