// Relative times ("3 min ago") and running clocks ("1m 04s"), kept current.
//
// The server writes both (app/templating.py: relative, format_elapsed), so a
// page reads right without JavaScript. This rewrites them every second with
// the same rules, and at once in fragments swapped in (live updates, htmx):
// a MutationObserver sees every swap, whoever makes it.
(function () {
  var EVERY = 1000;      // ms between updates
  var JUST_NOW = 5;      // seconds either way that read as "just now"
  // [below this many seconds, unit in seconds, label]: the first that fits.
  var UNITS = [[60, 1, 's'], [3600, 60, 'min'], [48 * 3600, 3600, 'h'], [30 * 86400, 86400, 'd']];

  function relative(date, now) {
    var seconds = (now - date.getTime()) / 1000;
    var distance = Math.abs(seconds);
    if (distance < JUST_NOW) return 'just now';
    for (var i = 0; i < UNITS.length; i++) {
      if (distance < UNITS[i][0]) {
        var amount = Math.floor(distance / UNITS[i][1]) + ' ' + UNITS[i][2];
        return seconds > 0 ? amount + ' ago' : 'in ' + amount;
      }
    }
    return date.toISOString().slice(0, 10);
  }

  function pad(n) { return (n < 10 ? '0' : '') + n; }

  function elapsed(seconds) {
    var total = Math.max(Math.floor(seconds), 0);
    if (total < 60) return total + ' s';
    var minutes = Math.floor(total / 60), secs = total % 60;
    var hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    return hours ? hours + 'h ' + pad(minutes) + 'm ' + pad(secs) + 's'
                 : minutes + 'm ' + pad(secs) + 's';
  }

  function set(el, text) {
    if (el && el.textContent !== text) el.textContent = text;
  }

  function update() {
    var now = Date.now();
    document.querySelectorAll('time[data-relative]').forEach(function (el) {
      var date = new Date(el.getAttribute('datetime'));
      if (!isNaN(date.getTime())) set(el.querySelector('.ago'), relative(date, now));
    });
    document.querySelectorAll('.elapsed[data-since]').forEach(function (el) {
      var since = Date.parse(el.getAttribute('data-since'));
      if (!isNaN(since)) set(el, elapsed((now - since) / 1000));
    });
  }

  document.addEventListener('DOMContentLoaded', function () {
    update();
    setInterval(update, EVERY);
    // Our own writes change only text that is already right the next time.
    new MutationObserver(function (records) {
      for (var i = 0; i < records.length; i++) {
        if (records[i].addedNodes.length) { update(); return; }
      }
    }).observe(document.body, {childList: true, subtree: true});
  });
})();
