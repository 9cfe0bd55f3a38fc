// The jobs list's selection: tick every job on the page, then every job
// matching the filter.
//
// Without JavaScript the bulk bar's "With" select chooses between the
// ticked jobs and every job matching the filter; this adds a tick box in
// the table's head for the page, and, once the whole page is ticked and
// more jobs match, a button that chooses every matching job (the same
// select, set to "filter"). The count comes from the live #job-count
// fragment (data-count, data-exact).
(function () {
  function boxes() { return Array.prototype.slice.call(document.querySelectorAll('table.jobs input[name=ids]')); }
  function scope() { return document.getElementById('bulk-scope'); }

  function matching() {
    var el = document.getElementById('job-count');
    if (!el || el.getAttribute('data-count') === '') return null;
    return {n: Number(el.getAttribute('data-count')), exact: el.getAttribute('data-exact') === 'true'};
  }

  function plural(n) { return n.toLocaleString('en') + (n === 1 ? ' job' : ' jobs'); }

  function refresh() {
    var all = document.getElementById('select-page');
    if (!all) return;
    var list = boxes(), ticked = list.filter(function (b) { return b.checked; }).length;
    all.hidden = list.length === 0;
    all.checked = list.length > 0 && ticked === list.length;
    all.indeterminate = ticked > 0 && ticked < list.length;
    var bar = document.getElementById('select-matching');
    var select = scope(), count = matching();
    if (!bar || !select) return;
    var button = document.getElementById('select-matching-button');
    var note = bar.querySelector('.select-matching-note');
    if (select.value === 'filter') {
      bar.hidden = false;
      note.textContent = count ? 'All ' + (count.exact ? '' : 'of at least ') + plural(count.n)
        + ' matching this filter are selected.' : 'Every job matching this filter is selected.';
      button.textContent = 'Clear selection';
      button.setAttribute('data-choose', 'selected');
    } else if (all.checked && count && count.n > list.length) {
      bar.hidden = false;
      note.textContent = 'All ' + plural(list.length) + ' on this page are selected.';
      button.textContent = 'Select all ' + (count.exact ? '' : 'of at least ') + plural(count.n)
        + ' matching this filter';
      button.setAttribute('data-choose', 'filter');
    } else {
      bar.hidden = true;
    }
  }

  document.addEventListener('change', function (event) {
    var target = event.target;
    if (target.id === 'select-page') {
      boxes().forEach(function (b) { b.checked = target.checked; });
      if (!target.checked && scope()) scope().value = 'selected';
    } else if (target.name === 'ids' && !target.checked && scope()) {
      scope().value = 'selected';  // one unticked: no longer every matching job
    }
    refresh();
  });

  document.addEventListener('click', function (event) {
    if (event.target.id !== 'select-matching-button') return;
    var choose = event.target.getAttribute('data-choose');
    scope().value = choose;
    if (choose === 'selected') {
      boxes().forEach(function (b) { b.checked = false; });
    }
    refresh();
  });

  // Rows and the count are swapped in live: keep the head box and the note true.
  document.addEventListener('htmx:after:swap', refresh);
  document.addEventListener('htmx:after:settle', refresh);
  document.addEventListener('DOMContentLoaded', refresh);
})();
