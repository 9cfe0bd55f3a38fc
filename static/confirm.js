// A form with data-confirm asks its question before it is sent.
//
// Here, not in an onsubmit attribute: the Content-Security-Policy runs no
// inline script. Listening on the document covers forms swapped in later
// (live fragments). Without JavaScript the form is sent unasked.
document.addEventListener('submit', function (event) {
  var question = event.target.getAttribute('data-confirm');
  if (question !== null && !window.confirm(question)) event.preventDefault();
}, true);
