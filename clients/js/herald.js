// herald-client: subscribe to a herald hub from a browser or Node 20+.
//
// connect() keeps one connection (Server-Sent Events or WebSocket) open
// for as long as you want it: it reconnects after every failure with
// exponential backoff and full jitter, resumes from the last event id it
// saw, reports herald.reset, reconnects at once when the browser comes back
// online, and never has two connections open at once.
//
// watchVersion() compares the versions herald announces (Kubernetes
// Deployments, or anything published with the event name "version") with
// the build that is loaded, not with the last message seen.
//
// No dependencies. Apache-2.0.

const PREFIX = 'herald.';
const enc = encodeURIComponent;

/** The delay before reconnect attempt `attempt` (0-based): full jitter. */
export function backoffDelay(attempt, { minDelay = 500, maxDelay = 30000 } = {}, random = Math.random) {
  const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

function parse(text) {
  if (typeof text !== 'string' || !/^\s*[[{"]/.test(text)) return text;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Opens a subscription. See herald.d.ts for the options. */
export function connect(options) {
  const o = { transport: 'auto', minDelay: 500, maxDelay: 30000, ...options };
  const g = globalThis;
  const WS = o.WebSocket || g.WebSocket;
  const ES = o.EventSource || g.EventSource;
  const kind = o.transport === 'auto' ? (WS ? 'ws' : 'sse') : o.transport;
  if (kind !== 'ws' && kind !== 'sse') throw new Error('herald: transport must be sse, ws or auto');
  if (!(kind === 'ws' ? WS : ES)) throw new Error(`herald: no ${kind === 'ws' ? 'WebSocket' : 'EventSource'} implementation; pass one in the options`);
  const base = String(o.url || (g.location ? g.location.origin : '')).replace(/\/+$/, '');
  if (!base) throw new Error('herald: url is required');
  const channels = new Set([].concat(o.channels || []));
  const handlers = new Map();
  const seen = [];
  let lastId = o.lastEventId || '';
  let sock = null;
  let timer = null;
  let attempt = 0;
  let closed = false;
  // WebSocket: the channels the server has for this socket.
  let sent = new Set();

  const emit = (name, arg) => {
    for (const fn of [...(handlers.get(name) || [])]) {
      try {
        fn(arg);
      } catch (e) {
        // One handler's error stops no other: it goes to 'herald.error'
        // handlers, or is rethrown on its own turn (window.onerror).
        if (name !== PREFIX + 'error' && handlers.get(PREFIX + 'error')?.size) emit(PREFIX + 'error', e);
        else
          setTimeout(() => {
            throw e;
          });
      }
    }
  };
  const setState = (s) => {
    if (client.state !== s) {
      client.state = s;
      emit(PREFIX + 'state', s);
    }
  };
  const deliver = (ev) => {
    if (ev.id) {
      if (seen.includes(ev.id)) return;
      seen.push(ev.id);
      if (seen.length > 512) seen.shift();
      lastId = ev.id;
    }
    attempt = 0;
    emit(ev.event, ev);
    emit('*', ev);
  };
  const drop = () => {
    if (!sock) return;
    const s = sock;
    sock = null;
    s.onopen = s.onmessage = s.onerror = s.onclose = null;
    try {
      s.close();
    } catch {}
  };
  const retry = () => {
    drop();
    if (closed || timer) return;
    setState('connecting');
    timer = setTimeout(open, backoffDelay(attempt++, o));
  };
  const query = (name) => {
    const q = [...channels].map((c) => name + '=' + enc(c));
    // SSE: each event's data says its channel ({"channel","data"}).
    if (name === 'stream') q.push('envelope=json');
    if (lastId) q.push('lastEventId=' + enc(lastId));
    return q.length ? '?' + q.join('&') : '';
  };
  const listenSse = (s, name) =>
    s.addEventListener(name, (e) => {
      if (sock !== s) return;
      const reset = name === PREFIX + 'reset';
      const env = parse(e.data);
      // The envelope (a reset carries its channel as it is).
      const wrapped = !reset && env && typeof env === 'object' && 'channel' in env;
      const text = wrapped ? (typeof env.data === 'string' ? env.data : JSON.stringify(env.data)) : e.data;
      deliver({
        id: reset ? '' : e.lastEventId,
        event: name,
        channel: env && env.channel,
        data: wrapped ? parse(text) : env,
        text,
      });
    });
  const named = () => [...handlers.keys()].filter((n) => n !== '*' && n !== 'message' && !n.startsWith(PREFIX));

  function open() {
    timer = null;
    if (closed) return;
    drop();
    setState('connecting');
    if (kind === 'sse') {
      // herald needs at least one stream; wait for subscribe().
      if (!channels.size) return;
      const s = (sock = new ES(base + '/events' + query('stream')));
      s.onopen = () => setState('open');
      s.onerror = () => {
        // Take reconnection over from EventSource: backoff, and a fresh
        // lastEventId when the browser would give up.
        if (sock === s) retry();
      };
      for (const n of ['message', PREFIX + 'reset', ...named()]) listenSse(s, n);
    } else {
      const s = (sock = new WS(base.replace(/^http/, 'ws') + '/ws' + query('channel')));
      sent = new Set(channels);
      s.onopen = () => {
        // Catch up with subscribe()/unsubscribe() made while connecting.
        for (const c of channels) if (!sent.has(c)) frame('subscribe', c);
        for (const c of sent) if (!channels.has(c)) frame('unsubscribe', c);
        setState('open');
      };
      s.onmessage = (m) => {
        let f;
        try {
          f = JSON.parse(m.data);
        } catch {
          return;
        }
        if (f.type === 'event') {
          deliver({ id: f.id, event: f.event, channel: f.channel, data: f.data, text: typeof f.data === 'string' ? f.data : JSON.stringify(f.data) });
        } else if (f.type === 'reset') {
          deliver({ id: '', event: PREFIX + 'reset', channel: f.channel, data: f, text: m.data });
        } else {
          emit(PREFIX + f.type, f);
        }
      };
      s.onclose = s.onerror = () => {
        if (sock === s) retry();
      };
    }
  }

  const online = () => {
    if (closed || client.state === 'open') return;
    clearTimeout(timer);
    timer = null;
    attempt = 0;
    open();
  };
  const frame = (type, channel) => {
    sock.send(JSON.stringify({ type, channel }));
    if (type === 'subscribe') sent.add(channel);
    else sent.delete(channel);
  };
  // SSE subscriptions are fixed per connection: reconnect with the new set.
  // A WebSocket that is open is told; one that is connecting catches up.
  const changed = (type, channel) => {
    if (kind === 'sse') {
      clearTimeout(timer);
      timer = null;
      open();
    } else if (sock && client.state === 'open') frame(type, channel);
  };

  const client = {
    state: 'connecting',
    get lastEventId() {
      return lastId;
    },
    get channels() {
      return [...channels];
    },
    on(name, fn) {
      if (!handlers.has(name)) {
        handlers.set(name, new Set());
        if (kind === 'sse' && sock && named().includes(name)) listenSse(sock, name);
      }
      handlers.get(name).add(fn);
      return client;
    },
    off(name, fn) {
      handlers.get(name)?.delete(fn);
      return client;
    },
    subscribe(channel) {
      if (closed || channels.has(channel)) return client;
      channels.add(channel);
      changed('subscribe', channel);
      return client;
    },
    unsubscribe(channel) {
      if (closed || !channels.delete(channel)) return client;
      changed('unsubscribe', channel);
      return client;
    },
    close() {
      closed = true;
      clearTimeout(timer);
      timer = null;
      drop();
      g.removeEventListener?.('online', online);
      setState('closed');
    },
  };
  g.addEventListener?.('online', online);
  open();
  return client;
}

/** An identity for a version: its images and template hash, or its JSON. */
export function versionKey(v) {
  if (v && typeof v === 'object') {
    return Array.isArray(v.images) ? v.images.map((i) => i.sha256).join(',') + '@' + (v.pod_template_hash || '') : JSON.stringify(v);
  }
  return String(v);
}

/** True if announced version `v` is the loaded build `current`. */
export function isCurrent(v, current) {
  if (typeof current === 'function') return !!current(v);
  if (current && typeof current === 'object') return versionKey(current) === versionKey(v);
  const c = String(current).replace(/^sha256:/, '');
  if (!v || typeof v !== 'object') return String(v) === c;
  const ids = [v.version, v.build, v.pod_template_hash, v.current_image?.sha256, v.current_image?.name];
  for (const i of v.images || []) ids.push(i.sha256, i.name);
  return ids.some((x) => x != null && String(x) === c);
}

/** Announces new versions of the app that is loaded. See herald.d.ts. */
export function watchVersion(options) {
  const { deployment, onUpdate, autoReload = false, target, reload, client: given, ...rest } = options;
  const g = globalThis;
  const channel = deployment.includes('/') ? 'k8s.deployment:' + deployment.replace('/', ':') : deployment;
  const client = given || connect({ ...rest, channels: [channel] });
  if (given) client.subscribe(channel);
  let current = options.current;
  const announced = new Set();
  let armed = false;
  const handler = (ev) => {
    if (ev.channel && ev.channel !== channel) return;
    const next = ev.data;
    if (current == null) {
      current = next;
      return;
    }
    const key = versionKey(next);
    if (isCurrent(next, current) || announced.has(key)) return;
    announced.add(key);
    onUpdate?.(next, current);
    const t = target || g.window;
    if (t?.dispatchEvent && typeof CustomEvent === 'function') {
      t.dispatchEvent(new CustomEvent('herald:update-available', { detail: { next, current } }));
    }
    const doc = g.document;
    if (autoReload === 'when-hidden' && doc && !armed) {
      armed = true;
      const onHidden = () => {
        if (doc.visibilityState === 'hidden') {
          doc.removeEventListener('visibilitychange', onHidden);
          (reload || (() => g.location.reload()))();
        }
      };
      doc.addEventListener('visibilitychange', onHidden);
    }
  };
  client.on('version', handler);
  return {
    client,
    close() {
      client.off('version', handler);
      if (!given) client.close();
    },
  };
}
