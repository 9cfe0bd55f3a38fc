// Keyboard shortcuts, and their help (press ?).
//
//   /        focus the page's search field
//   j / k    next / previous row of the page's table
//   Enter    open the current row
//   g then d, j, q, s, p, f, w, a, n   go to a page (dashboard, jobs, queues...)
//   ?        this help, as a modal dialog (Esc closes it)
//
// Keys typed into a field, or with Ctrl, Alt or Meta held, are left alone.
// Pages are found through the header's own links, so a prefix the app is
// served under (a proxy's X-Forwarded-Prefix) is kept.
(function () {
  var PAGES = [
    ['d', 'Dashboard', 'header a.brand'],
    ['j', 'Jobs', 'header a[href$="/jobs"]'],
    ['q', 'Queues', 'header a[href$="/queues"]'],
    ['s', 'Scheduled', 'header a[href$="/scheduled"]'],
    ['p', 'Periodic', 'header a[href$="/periodic"]'],
    ['f', 'Failures', 'header a[href$="/failures"]'],
    ['w', 'Workers', 'header a[href$="/workers"]'],
    ['a', 'Alerts', 'header a[href$="/alerts"]'],
    ['n', 'Submit a job', 'header a[href$="/jobs/new"]']
  ];
  var KEYS = [
    ['/', 'Focus the search field'],
    ['j', 'Next row'],
    ['k', 'Previous row'],
    ['Enter', 'Open the current row'],
    ['?', 'Show or hide this help'],
    ['Esc', 'Close this help']
  ];
  var G_WAIT = 1500;  // ms a "g" waits for the page's letter
  var pendingG = 0;

  var NOT_TEXT = /^(checkbox|radio|button|submit|reset|range|color|file|image)$/;
  // The row j/k chose, by id: a live update replaces the row's element, and
  // the choice (and the focus on its link) is put back on its successor.
  var chosen = null;

  function restore() {
    if (!chosen) return;
    var row = document.getElementById(chosen.id);
    if (!row || row.classList.contains('row-current')) return;
    row.classList.add('row-current');
    row.setAttribute('aria-current', 'true');
    var link = row.querySelector('a[href]');
    if (chosen.focused && link && (document.activeElement === document.body || !document.activeElement)) {
      link.focus({preventScroll: true});
    }
  }
  ['htmx:after:swap', 'htmx:after:settle', 'htmx:ws:after:message:incoming'].forEach(function (name) {
    document.addEventListener(name, function () { setTimeout(restore, 0); });
  });
  document.addEventListener('focusin', function () {
    if (chosen) chosen.focused = !!(document.activeElement && document.activeElement.closest &&
                                    document.activeElement.closest('tr.row-current'));
  });

  function typing(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    if (tag === 'input') return !NOT_TEXT.test(target.type || 'text');  // a tick box is not typed in
    return tag === 'textarea' || tag === 'select' || target.isContentEditable;
  }

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll('main table tbody tr[id]'))
      .filter(function (row) { return row.offsetParent !== null; });
  }

  function current() { return document.querySelector('main tr.row-current'); }

  function move(step) {
    var list = rows();
    if (!list.length) return;
    var at = list.indexOf(current());
    var next = at < 0 ? (step > 0 ? 0 : list.length - 1) : Math.min(Math.max(at + step, 0), list.length - 1);
    list.forEach(function (row) { row.classList.remove('row-current'); row.removeAttribute('aria-current'); });
    var row = list[next];
    row.classList.add('row-current');
    row.setAttribute('aria-current', 'true');
    var link = row.querySelector('a[href]');
    chosen = {id: row.id, focused: !!link};
    if (link) link.focus({preventScroll: true});
    row.scrollIntoView({block: 'nearest'});
  }

  function open() {
    var row = current();
    var link = row && row.querySelector('a[href]');
    if (link) { link.click(); return true; }
    return false;
  }

  function go(letter) {
    for (var i = 0; i < PAGES.length; i++) {
      if (PAGES[i][0] !== letter) continue;
      var link = document.querySelector(PAGES[i][2]);
      if (link) window.location.href = link.href;
      return true;
    }
    return false;
  }

  function cell(tag, text, className) {
    var el = document.createElement(tag);
    el.textContent = text;
    if (className) el.className = className;
    return el;
  }

  function help() {
    var dialog = document.getElementById('shortcuts');
    if (dialog) return dialog;
    dialog = document.createElement('dialog');
    dialog.id = 'shortcuts';
    dialog.className = 'shortcuts';
    dialog.setAttribute('aria-labelledby', 'shortcuts-title');
    dialog.appendChild(cell('h2', 'Keyboard shortcuts')).id = 'shortcuts-title';
    var table = document.createElement('table');
    var caption = cell('caption', 'Keys work anywhere but in a text field.', 'sr-only');
    table.appendChild(caption);
    var body = document.createElement('tbody');
    function add(keys, what) {
      var tr = document.createElement('tr');
      var th = document.createElement('th');
      th.setAttribute('scope', 'row');
      keys.forEach(function (k, i) {
        if (i) th.appendChild(document.createTextNode(' then '));
        th.appendChild(cell('kbd', k));
      });
      tr.appendChild(th);
      tr.appendChild(cell('td', what));
      body.appendChild(tr);
    }
    KEYS.forEach(function (k) { add([k[0]], k[1]); });
    PAGES.forEach(function (p) {
      if (document.querySelector(p[2])) add(['g', p[0]], 'Go to ' + p[1]);
    });
    table.appendChild(body);
    dialog.appendChild(table);
    var form = document.createElement('form');
    form.method = 'dialog';
    var close = cell('button', 'Close', 'btn');
    close.type = 'submit';
    form.appendChild(close);
    dialog.appendChild(form);
    document.body.appendChild(dialog);
    return dialog;
  }

  function toggleHelp() {
    var dialog = help();
    if (dialog.open) dialog.close(); else dialog.showModal();
  }

  document.addEventListener('keydown', function (event) {
    if (event.ctrlKey || event.altKey || event.metaKey || event.defaultPrevented) return;
    if (typing(event.target)) return;
    var key = event.key;
    var dialog = document.getElementById('shortcuts');
    if (dialog && dialog.open) {
      if (key === '?') { event.preventDefault(); dialog.close(); }
      return;  // the dialog is modal: nothing else while it is open
    }
    if (pendingG && Date.now() - pendingG < G_WAIT) {
      pendingG = 0;
      if (go(key)) { event.preventDefault(); return; }
    }
    pendingG = 0;
    if (key === '?') { event.preventDefault(); toggleHelp(); }
    else if (key === '/') {
      var search = document.querySelector('main input[type=search]');
      if (search) { event.preventDefault(); search.focus(); search.select(); }
    } else if (key === 'j') { event.preventDefault(); move(1); }
    else if (key === 'k') { event.preventDefault(); move(-1); }
    else if (key === 'Enter') {
      // A focused link or button does its own thing; Enter elsewhere opens the row.
      var tag = event.target.tagName && event.target.tagName.toLowerCase();
      if (tag !== 'a' && tag !== 'button' && open()) event.preventDefault();
    } else if (key === 'g') { pendingG = Date.now(); }
  });
})();
