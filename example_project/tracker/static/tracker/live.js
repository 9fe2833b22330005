/* Keeps the people list current: fetch the fragment every two seconds, swap it in when it changed. */
(function () {
  "use strict";
  var box = document.getElementById("people");
  if (!box) {
    return;
  }
  var last = box.innerHTML;
  function refresh() {
    fetch(box.dataset.url, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== last) {
          box.innerHTML = html;
          last = html;
        }
      })
      .catch(function () {})
      .finally(function () {
        setTimeout(refresh, 2000);
      });
  }
  setTimeout(refresh, 2000);
})();
