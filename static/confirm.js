// A form with data-confirm asks its question before it is sent.
//
// Here, not in an onsubmit attribute: the Content-Security-Policy runs no
// inline script. Listening on the document covers forms swapped in later
// (live fragments). A question answered here is sent as confirmed=1, so the
// server does not ask again; without JavaScript the server's own
// confirmation page asks instead.
document.addEventListener('submit', function (event) {
  var form = event.target;
  var question = form.getAttribute('data-confirm');
  if (question === null) return;
  if (!window.confirm(question)) { event.preventDefault(); return; }
  if (!form.querySelector('input[name=confirmed]')) {
    var confirmed = document.createElement('input');
    confirmed.type = 'hidden';
    confirmed.name = 'confirmed';
    confirmed.value = '1';
    form.appendChild(confirmed);
  }
}, true);
