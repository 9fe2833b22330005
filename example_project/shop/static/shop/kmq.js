/*
 * Plays the Kissmetrics JavaScript library's part while the demo sends to its stand-in
 * tracker. The real library is loaded from i.kissmetrics.io, which an offline machine
 * cannot reach and which would send to Kissmetrics, not to the stand-in. Like the real
 * library, it runs the commands {% kissmetrics_js %} queued in _kmq and reads the km_ni
 * and km_ai cookies, so browser-side events land on the same person as the server's.
 * Its cookies behave as the real library's do: identify(x) without km_ni aliases x to
 * km_ai and sets km_ni; with km_ni set it writes x into km_ai as well; clearIdentity
 * deletes km_ai only when km_ni was set, then km_ni. The demo's settings make the tag
 * load it (KISSMETRICS["SCRIPT_URLS"]) while KISSMETRICS["TRACKING_URL"] is the
 * stand-in, with the tracker's URL in ?url=.
 */
(function () {
  "use strict";
  if (typeof window._kmk === "undefined") {
    return; // No consent yet: {% kissmetrics_js %} left the loader inert, and so stays this.
  }
  var script = document.currentScript;
  var base = new URL(script.src).searchParams.get("url");
  var key = window._kmk;
  var FIVE_YEARS = 5 * 365 * 24 * 3600 * 1000;
  var queue = (window._kmq = window._kmq || []);
  if (!Array.isArray(queue)) {
    return; // The real library got here first and owns the queue.
  }

  function cookie(name) {
    var pairs = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < pairs.length; i++) {
      var eq = pairs[i].indexOf("=");
      if (pairs[i].slice(0, eq) === name) {
        return decodeURIComponent(pairs[i].slice(eq + 1));
      }
    }
    return null;
  }

  function domain() {
    return window.KM_COOKIE_DOMAIN ? "; domain=" + window.KM_COOKIE_DOMAIN : "";
  }

  function write(name, value) {
    document.cookie = name + "=" + encodeURIComponent(value) + "; path=/; expires=" +
      new Date(Date.now() + FIVE_YEARS).toUTCString() + domain();
  }

  function erase(name) {
    document.cookie = name + "=; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT" + domain();
  }

  function send(path, name, properties, person) {
    person = person || cookie("km_ni") || cookie("km_ai");
    if (!person) {
      return;
    }
    var params = { _k: key, _p: person, _t: Math.floor(Date.now() / 1000), _d: 1 };
    if (name !== null) {
      params._n = name;
    }
    Object.keys(properties || {}).forEach(function (prop) {
      params[prop] = properties[prop];
    });
    var query = Object.keys(params).map(function (k) {
      return encodeURIComponent(k) + "=" + encodeURIComponent(String(params[k]));
    });
    // keepalive: the request outlives a click that leaves the page.
    fetch(base + path + "?" + query.join("&"), {
      mode: "no-cors",
      credentials: "omit",
      keepalive: true,
    });
  }

  function run(command) {
    switch (command[0]) {
      case "identify":
        if (cookie("km_ni") === null) {
          var anonymous = cookie("km_ai");
          if (anonymous && anonymous !== command[1]) {
            send("/a", command[1], {}, anonymous);
          }
        } else {
          write("km_ai", command[1]);
        }
        write("km_ni", command[1]);
        break;
      case "clearIdentity":
        if (cookie("km_ni") !== null) {
          erase("km_ai");
        }
        erase("km_ni");
        break;
      case "record":
        send("/e", command[1], command[2]);
        break;
      case "set":
        send("/s", null, command[1]);
        break;
      case "trackClick":
      case "trackSubmit":
      case "trackClickOnOutboundLink":
        trigger(command[0], command[1], command[2], command[3]);
        break;
    }
  }

  // Triggers, as the Kissmetrics documentation describes them: trackClick records when
  // the element is pressed (mousedown), trackSubmit when the form is submitted, and
  // trackClickOnOutboundLink on the click, following the link 250 ms later so that the
  // hit leaves first. An element is named by id ("#buy" or "buy") or class (".buy").
  function elements(selector) {
    if (selector.charAt(0) === ".") {
      return Array.prototype.slice.call(document.getElementsByClassName(selector.slice(1)));
    }
    var element = document.getElementById(selector.replace(/^#/, ""));
    return element ? [element] : [];
  }

  // The field names the library never sends, once "_" and "-" are taken out of them:
  // passwords, card numbers, security codes, social security numbers.
  var SENSITIVE = /pass|billing|creditcard|cardnum|^cc|ccnum|exp|seccode|securitycode|securitynum|cvc|cvv|ssn|socialsec|socsec|csc/i;

  function fieldName(field) {
    return (field.name || "").replace(/^(.+?)\[(.+?)\]/, "$1_$2");
  }

  function sendsField(field) {
    var classes = (field.className || "").split(" ");
    if (classes.indexOf("km_include") >= 0) {
      return true;
    }
    if (classes.indexOf("km_ignore") >= 0 || !field.name) {
      return false;
    }
    var tag = field.nodeName.toLowerCase();
    if (tag === "input" && !/^(text|radio|checkbox)$/i.test(field.type)) {
      return false; // Hidden, password, file and the rest.
    }
    if (tag !== "input" && tag !== "select") {
      return false;
    }
    if (SENSITIVE.test(fieldName(field).replace(/[_-]/g, ""))) {
      return false;
    }
    return !/^(radio|checkbox)$/i.test(field.type) || field.checked;
  }

  function formFields(form) {
    var found = {};
    Array.prototype.forEach.call(form.querySelectorAll("input, select, textarea"), function (f) {
      if (sendsField(f)) {
        found[fieldName(f)] = f.value;
      }
    });
    return found;
  }

  function trigger(kind, selector, name, properties) {
    function bind() {
      elements(selector).forEach(function (element) {
        if (kind === "trackClick") {
          element.addEventListener("mousedown", function () {
            send("/e", name, properties);
          });
        } else if (kind === "trackSubmit") {
          element.addEventListener("submit", function () {
            var fields = window.KM_SKIP_FORM_FIELDS ? {} : formFields(element);
            send("/e", name, Object.assign(fields, properties || {}));
          });
        } else {
          element.addEventListener("click", function (event) {
            send("/e", name, properties);
            var link = event.target.closest("a[href]");
            var modified = event.shiftKey || event.altKey || event.ctrlKey || event.metaKey;
            if (link && !link.target && !modified) {
              event.preventDefault();
              setTimeout(function () {
                window.location.href = link.href;
              }, 250);
            }
          });
        }
      });
    }
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", bind);
    } else {
      bind();
    }
  }

  // The library's own "Visited Site": once per 30-minute visit (the km_vs cookie), with the
  // page's URL and referrer, unless the page says the server records it
  // (KM_SKIP_VISITED_SITE, set by the tag when AUTO_EVENTS has it).
  function visitedSite() {
    if (window.KM_SKIP_VISITED_SITE) {
      return;
    }
    if (!cookie("km_vs")) {
      send("/e", "Visited Site", { URL: location.href, Referrer: document.referrer || "Direct" });
    }
    document.cookie = "km_vs=1; path=/; max-age=1800";
  }

  queue.forEach(run);
  visitedSite();
  var push = queue.push;
  queue.push = function () {
    Array.prototype.forEach.call(arguments, run);
    return push.apply(queue, arguments);
  };
})();
