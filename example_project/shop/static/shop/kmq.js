/*
 * Plays the Kissmetrics JavaScript library's part while the demo sends to its stand-in
 * tracker. The real library is loaded from i.kissmetrics.io, which an offline machine
 * cannot reach and which would send to Kissmetrics, not to the stand-in. Like the real
 * library, it runs the commands {% kissmetrics_js %} queued in _kmq and reads the km_ai
 * cookie the server wrote, so browser-side events land on the same person as the
 * server's. The demo's settings make the tag load it (KISSMETRICS["SCRIPT_URLS"]) while
 * KISSMETRICS["TRACKING_URL"] is the stand-in, with the tracker's URL in ?url=.
 */
(function () {
  "use strict";
  if (typeof window._kmk === "undefined") {
    return; // No consent yet: {% kissmetrics_js %} left the loader inert, and so stays this.
  }
  var script = document.currentScript;
  var base = new URL(script.src).searchParams.get("url");
  var key = window._kmk;
  var named = null;
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

  function send(path, name, properties) {
    var person = named || cookie("km_ai");
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
        named = command[1];
        break;
      case "clearIdentity":
        named = null;
        break;
      case "record":
        send("/e", command[1], command[2]);
        break;
      case "set":
        send("/s", null, command[1]);
        break;
    }
  }

  queue.forEach(run);
  var push = queue.push;
  queue.push = function () {
    Array.prototype.forEach.call(arguments, run);
    return push.apply(queue, arguments);
  };
})();
