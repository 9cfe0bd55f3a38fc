// The colour theme: light, dark, or the system's (prefers-color-scheme).
//
// Loaded in <head>, not deferred, so the stored choice applies before the
// page is first painted (no flash of the other theme). The choice lives in
// localStorage under "qm-theme"; "system", or nothing stored, leaves
// data-theme off <html> and app.css follows the system setting. Here rather
// than inline: the Content-Security-Policy runs no inline script.
(function () {
  var KEY = 'qm-theme';
  var CHOICES = ['system', 'light', 'dark'];
  var root = document.documentElement;

  function stored() {
    try {
      var value = window.localStorage.getItem(KEY);
      return CHOICES.indexOf(value) >= 0 ? value : 'system';
    } catch (e) {
      return 'system';  // storage refused (a privacy mode): follow the system
    }
  }

  function apply(choice) {
    if (choice === 'light' || choice === 'dark') root.setAttribute('data-theme', choice);
    else root.removeAttribute('data-theme');
  }

  apply(stored());

  // The header's picker: shown only where this script runs (without
  // JavaScript the page follows the system and offers nothing that cannot work).
  document.addEventListener('DOMContentLoaded', function () {
    var select = document.getElementById('theme-choice');
    if (!select) return;
    select.value = stored();
    select.closest('[hidden]') && select.closest('[hidden]').removeAttribute('hidden');
    select.addEventListener('change', function () {
      try { window.localStorage.setItem(KEY, select.value); } catch (e) { /* kept for this page only */ }
      apply(select.value);
    });
  });

  // Another tab changed the choice: follow it.
  window.addEventListener('storage', function (event) {
    if (event.key !== KEY) return;
    var choice = stored();
    apply(choice);
    var select = document.getElementById('theme-choice');
    if (select) select.value = choice;
  });
})();
