// The live indicator: the server swaps in "live" with each snapshot; this
// shows when the socket drops, so a stale page never looks current.
(function () {
  var RECONNECTS = [1001, 1005, 1006, 1011, 1012, 1013, 1014];
  function show(text, on) {
    var status = document.getElementById('live-status');
    if (!status) return;
    status.className = 'live ' + (on ? 'live-on' : 'live-off');
    status.textContent = text;
  }
  document.addEventListener('htmx:ws:close', function (event) {
    var code = event.detail && event.detail.code;
    if (code === null || RECONNECTS.indexOf(code) >= 0) show('reconnecting…', false);
    else show('offline: reload to refresh', false);
  });
  document.addEventListener('htmx:ws:error', function () { show('reconnecting…', false); });
})();
