// Copy buttons: a button with data-copy-text copies that text; one with
// data-copy-target copies the text of the element with that id.
//
// The buttons are rendered hidden (without JavaScript they can do nothing)
// and shown here, in fragments swapped in later too. The Clipboard API needs
// a secure context (https, or this machine); elsewhere the text is copied
// from a selected, off-screen text area. The button says "Copied" for a
// moment, and a status region tells screen readers.
(function () {
  var SHOWN_FOR = 2000;  // ms the button says what happened
  var status = null;

  function announce(message) {
    if (status === null) {
      status = document.createElement('div');
      status.className = 'sr-only';
      status.id = 'copy-status';
      status.setAttribute('role', 'status');
      document.body.appendChild(status);
    }
    status.textContent = message;
  }

  function selected(text) {
    var area = document.createElement('textarea');
    area.className = 'copy-buffer';
    area.value = text;
    area.setAttribute('readonly', '');
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function (error) {
        if (!selected(text)) throw error;
      });
    }
    return selected(text) ? Promise.resolve() : Promise.reject(new Error('copy refused'));
  }

  function tell(button, shown, message) {
    button.textContent = shown;
    announce(message);
    clearTimeout(button.copyTimer);
    button.copyTimer = setTimeout(function () { button.textContent = 'Copy'; }, SHOWN_FOR);
  }

  document.addEventListener('click', function (event) {
    var button = event.target.closest && event.target.closest('button[data-copy-text], button[data-copy-target]');
    if (!button) return;
    var text = button.getAttribute('data-copy-text');
    if (text === null) {
      var target = document.getElementById(button.getAttribute('data-copy-target'));
      if (!target) return;
      text = target.textContent;
    }
    announce('');
    copy(text).then(function () { tell(button, 'Copied', 'Copied'); },
                    function () { tell(button, 'Not copied', 'Not copied: select the text and copy it'); });
  });

  function reveal() {
    document.querySelectorAll('button.btn-copy[hidden]').forEach(function (b) { b.hidden = false; });
  }

  document.addEventListener('DOMContentLoaded', function () {
    reveal();
    new MutationObserver(reveal).observe(document.body, {childList: true, subtree: true});
  });
})();
