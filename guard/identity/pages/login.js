// MLflow's UI keeps its routes in the fragment (/#/experiments/3), which never reaches the
// server: carry it into the forms' "next" field so the login lands on the page asked for.
// The server validates the whole value again; this only appends what the browser shows.
(function () {
  "use strict";
  var hash = window.location.hash;
  if (!hash || hash.length > 1024) {
    return;
  }
  var fields = document.querySelectorAll('input[name="next"]');
  for (var i = 0; i < fields.length; i++) {
    if (fields[i].value.indexOf("#") === -1) {
      fields[i].value = fields[i].value + hash;
    }
  }
  // The single sign-on button is a link: its next travels in the query, percent-encoded.
  var sso = document.getElementById("sso-login");
  if (sso) {
    var next = sso.getAttribute("data-next") || "/";
    if (next.indexOf("#") === -1) {
      sso.setAttribute("href", "/guard/oidc/login?next=" + encodeURIComponent(next + hash));
    }
  }
})();
