// A spa-reloader client in Node, with a real WebSocket (the `ws` package),
// driven by herald's integration tests (tests/it/k8s.rs).
//
//   node spa-reloader-client.cjs package  URL   loads the published npm
//       package spa-reloader-vue unchanged (Vue.use(plugin, {spaReloaderURL}))
//       with the browser globals it needs: WebSocket, localStorage, Vue.
//   node spa-reloader-client.cjs contract URL   the same client rules,
//       written here from spa-reloader-vue's documented behaviour, for
//       machines whose npm registry does not carry that package.
//
// Each callback the client fires is printed as one JSON line:
//   {"received": <event>, "stored": <event or null>}
// A frame that is not exactly one JSON value throws (as in the browser)
// and ends the process with an error.
"use strict";

const WebSocket = require("ws");

const [mode, url] = process.argv.slice(2);
if (!url || !["package", "contract"].includes(mode)) {
  console.error("usage: spa-reloader-client.cjs package|contract URL");
  process.exit(2);
}

// The browser's localStorage, in memory.
const store = new Map();
global.localStorage = {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
  clear: () => store.clear(),
  key: (i) => [...store.keys()][i] ?? null,
  get length() {
    return store.size;
  },
};
global.WebSocket = WebSocket;
process.on("uncaughtException", (e) => {
  console.error("client error:", e && e.stack ? e.stack : e);
  process.exit(1);
});

function report(received, stored) {
  process.stdout.write(JSON.stringify({ received, stored }) + "\n");
}

if (mode === "package") {
  // Vue 2's plugin interface: install(Vue, options), prototype methods.
  const Vue = { prototype: {}, mixin() {} };
  let plugin = require("spa-reloader-vue");
  plugin = plugin.default || plugin;
  plugin.install(Vue, { spaReloaderURL: url });
  Vue.prototype.$spaSubscribe(report);
} else {
  const KEY = "spa-last-event";
  const ws = new WebSocket(url);
  ws.onmessage = (event) => {
    const received = JSON.parse(event.data);
    const raw = localStorage.getItem(KEY);
    const stored = raw ? JSON.parse(raw) : null;
    if (!stored) {
      report(received, null);
      localStorage.setItem(KEY, JSON.stringify(received));
      return;
    }
    if (
      stored.created_at != null &&
      received.created_at != null &&
      new Date(received.created_at).getTime() < new Date(stored.created_at).getTime()
    ) {
      return;
    }
    if (stored.current_image.sha256 !== received.current_image.sha256) {
      report(received, stored);
      localStorage.setItem(KEY, JSON.stringify(received));
    }
  };
  ws.onerror = (e) => {
    console.error("websocket error:", e.message);
    process.exit(1);
  };
}
