// Unit tests of herald-client with fake transports and fake timers:
// node --test test/
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { gzipSync } from 'node:zlib';
import { readFileSync } from 'node:fs';
import { connect, backoffDelay, watchVersion, versionKey, isCurrent } from '../herald.js';

// A WebSocket stand-in: records every instance and what was sent.
function fakeWs() {
  const all = [];
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.closed = false;
      all.push(this);
    }
    send(s) {
      this.sent.push(JSON.parse(s));
    }
    close() {
      this.closed = true;
    }
    // test side
    open() {
      this.onopen?.();
    }
    frame(v) {
      this.onmessage?.({ data: JSON.stringify(v) });
    }
    fail() {
      this.onclose?.({ code: 1006 });
    }
  }
  FakeWS.all = all;
  FakeWS.live = () => all.filter((s) => !s.closed);
  return FakeWS;
}

// An EventSource stand-in.
function fakeEs() {
  const all = [];
  class FakeES {
    constructor(url) {
      this.url = url;
      this.closed = false;
      this.listeners = new Map();
      all.push(this);
    }
    addEventListener(name, fn) {
      if (!this.listeners.has(name)) this.listeners.set(name, []);
      this.listeners.get(name).push(fn);
    }
    close() {
      this.closed = true;
    }
    open() {
      this.onopen?.();
    }
    emit(name, data, id) {
      this.lastEventId = id ?? this.lastEventId ?? '';
      for (const fn of this.listeners.get(name) || []) fn({ data, lastEventId: this.lastEventId });
    }
    fail() {
      this.onerror?.();
    }
  }
  FakeES.all = all;
  FakeES.live = () => all.filter((s) => !s.closed);
  return FakeES;
}

const ev = (id, data, channel = 'a', event = 'message') => ({ type: 'event', channel, id, event, data });

beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }));
afterEach(() => mock.timers.reset());

test('backoff is exponential with full jitter, and bounded', () => {
  const opts = { minDelay: 500, maxDelay: 30000 };
  assert.equal(backoffDelay(0, opts, () => 0.999999), 499);
  assert.equal(backoffDelay(3, opts, () => 0.5), 2000);
  assert.equal(backoffDelay(0, opts, () => 0), 0);
  for (let n = 0; n < 200; n++) assert.ok(backoffDelay(n, opts, () => 0.999999) < 30000);
  assert.equal(backoffDelay(1000, opts, () => 0.5), 15000);
});

test('states: connecting, open, connecting again after a failure, closed', () => {
  const WS = fakeWs();
  const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws' });
  const states = [];
  c.on('herald.state', (s) => states.push(s));
  assert.equal(c.state, 'connecting');
  assert.equal(WS.all[0].url, 'ws://h/ws?channel=a');
  WS.all[0].open();
  assert.equal(c.state, 'open');
  WS.all[0].fail();
  assert.equal(c.state, 'connecting');
  c.close();
  assert.equal(c.state, 'closed');
  assert.deepEqual(states, ['open', 'connecting', 'closed']);
  mock.timers.tick(60000);
  assert.equal(WS.all.length, 1, 'no reconnect after close');
});

test('reconnects with backoff, resumes after the last id, and never has two connections', () => {
  const WS = fakeWs();
  const c = connect({ url: 'https://h/', channels: ['a', 'b'], WebSocket: WS, transport: 'ws', minDelay: 100, maxDelay: 1000 });
  const got = [];
  c.on('*', (e) => got.push(e.id));
  WS.all[0].open();
  WS.all[0].frame(ev('0000000000000005', 'x'));
  WS.all[0].frame(ev('0000000000000007', { n: 1 }, 'b'));
  assert.equal(c.lastEventId, '0000000000000007');
  for (let round = 0; round < 6; round++) {
    WS.live()[0].fail();
    assert.equal(WS.live().length, 0);
    mock.timers.tick(1000);
    assert.equal(WS.live().length, 1, 'exactly one connection after the delay');
  }
  assert.equal(WS.live()[0].url, 'wss://h/ws?channel=a&channel=b&lastEventId=0000000000000007');
  // A replayed duplicate is dropped; later events go on.
  WS.live()[0].open();
  WS.live()[0].frame(ev('0000000000000007', { n: 1 }, 'b'));
  WS.live()[0].frame(ev('0000000000000009', 'y'));
  assert.deepEqual(got, ['0000000000000005', '0000000000000007', '0000000000000009']);
  c.close();
});

test('backoff grows while failures continue and resets after a connection delivers', () => {
  const WS = fakeWs();
  const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws', minDelay: 1000, maxDelay: 8000 });
  const real = Math.random;
  Math.random = () => 0.999;
  try {
    const waits = [];
    for (let i = 0; i < 5; i++) {
      WS.live()[0].fail();
      let waited = 0;
      while (WS.live().length === 0) {
        mock.timers.tick(10);
        waited += 10;
      }
      waits.push(waited);
    }
    assert.deepEqual(waits, [1000, 2000, 4000, 8000, 8000]);
    WS.live()[0].open();
    WS.live()[0].frame(ev('0000000000000001', 'x'));
    WS.live()[0].fail();
    let waited = 0;
    while (WS.live().length === 0) {
      mock.timers.tick(10);
      waited += 10;
    }
    assert.equal(waited, 1000);
  } finally {
    Math.random = real;
    c.close();
  }
});

test('the browser coming back online reconnects at once, once', () => {
  const WS = fakeWs();
  const target = new EventTarget();
  const saved = globalThis.addEventListener;
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws', minDelay: 60000, maxDelay: 60000 });
    WS.all[0].open();
    WS.all[0].fail();
    assert.equal(WS.live().length, 0);
    target.dispatchEvent(new Event('online'));
    assert.equal(WS.live().length, 1);
    target.dispatchEvent(new Event('online'));
    assert.equal(WS.live().length, 1, 'still one');
    mock.timers.tick(120000);
    assert.equal(WS.live().length, 1, 'the pending retry was cancelled');
    c.close();
  } finally {
    globalThis.addEventListener = saved;
    delete globalThis.removeEventListener;
  }
});

test('herald.reset reaches the application', () => {
  const WS = fakeWs();
  const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws' });
  const resets = [];
  c.on('herald.reset', (e) => resets.push(e.channel));
  WS.all[0].open();
  WS.all[0].frame({ type: 'reset', channel: 'a', reason: 'gone' });
  assert.deepEqual(resets, ['a']);
  c.close();
});

test('subscribe and unsubscribe over WebSocket: frames when open, caught up when connecting', () => {
  const WS = fakeWs();
  const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws' });
  c.subscribe('b');
  c.unsubscribe('a');
  WS.all[0].open();
  assert.deepEqual(WS.all[0].sent, [
    { type: 'subscribe', channel: 'b' },
    { type: 'unsubscribe', channel: 'a' },
  ]);
  c.subscribe('c');
  assert.deepEqual(WS.all[0].sent.at(-1), { type: 'subscribe', channel: 'c' });
  assert.deepEqual(c.channels, ['b', 'c']);
  WS.all[0].fail();
  mock.timers.tick(60000);
  assert.equal(WS.live()[0].url, 'ws://h/ws?channel=b&channel=c');
  c.close();
});

test('SSE: EventSource on /events, named listeners, resume on reconnect and on a new channel set', () => {
  const ES = fakeEs();
  const c = connect({ url: 'http://h', channels: ['a'], EventSource: ES, transport: 'sse', minDelay: 10, maxDelay: 10 });
  const got = [];
  c.on('message', (e) => got.push([e.event, e.channel, e.data]));
  c.on('version', (e) => got.push([e.event, e.channel, e.data]));
  const resets = [];
  c.on('herald.reset', (e) => resets.push(e.data.channel));
  const s = ES.all[0];
  assert.equal(s.url, 'http://h/events?stream=a&envelope=json');
  s.open();
  assert.equal(c.state, 'open');
  s.emit('message', '{"channel":"a","data":"hello"}', '0000000000000001');
  s.emit('version', '{"channel":"a","data":{"v":2}}', '0000000000000002');
  s.emit('herald.reset', '{"channel":"a","reason":"r"}');
  assert.deepEqual(got, [
    ['message', 'a', 'hello'],
    ['version', 'a', { v: 2 }],
  ]);
  assert.deepEqual(resets, ['a']);
  // A failure: EventSource's own retry is replaced by ours, with the id.
  s.fail();
  assert.ok(s.closed);
  mock.timers.tick(10);
  assert.equal(ES.live().length, 1);
  assert.equal(ES.live()[0].url, 'http://h/events?stream=a&envelope=json&lastEventId=0000000000000002');
  c.subscribe('b');
  assert.equal(ES.live().length, 1);
  assert.equal(ES.live()[0].url, 'http://h/events?stream=a&stream=b&envelope=json&lastEventId=0000000000000002');
  // Several channels: each event says its own.
  ES.live()[0].open();
  ES.live()[0].emit('message', '{"channel":"b","data":"from b"}', '0000000000000003');
  assert.deepEqual(got.at(-1), ['message', 'b', 'from b']);
  c.close();
  assert.equal(ES.live().length, 0);
});

test('auto picks WebSocket when there is one, else EventSource; missing ones are a clear error', () => {
  const WS = fakeWs();
  const ES = fakeEs();
  connect({ url: 'http://h', channels: ['a'], WebSocket: WS, EventSource: ES }).close();
  assert.equal(WS.all.length, 1);
  const saved = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    connect({ url: 'http://h', channels: ['a'], EventSource: ES }).close();
    assert.equal(ES.all.length, 1);
    assert.throws(() => connect({ url: 'http://h', transport: 'ws' }), /WebSocket/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
  assert.throws(() => connect({ url: 'http://h', transport: 'smoke', WebSocket: WS }), /transport/);
});

const version = (sha, hash = 'h1') => ({
  current_image: { name: 'app:1', sha256: sha },
  images: [{ container: 'app', name: 'app:1', sha256: sha }],
  pod_template_hash: hash,
});

test('versions compare with the loaded build, not the last message', () => {
  assert.ok(isCurrent(version('abc'), 'abc'));
  assert.ok(isCurrent(version('abc'), 'sha256:abc'));
  assert.ok(isCurrent(version('abc', 'tmpl'), 'tmpl'));
  assert.ok(isCurrent({ version: '1.2.3' }, '1.2.3'));
  assert.ok(!isCurrent(version('abc'), 'def'));
  assert.ok(isCurrent(version('abc'), version('abc')));
  assert.ok(!isCurrent(version('abc', 'h2'), version('abc', 'h1')));
  assert.ok(isCurrent(version('abc'), (v) => v.images.length === 1));
  assert.equal(versionKey(version('a', 'h')), 'a@h');
  assert.notEqual(versionKey(version('a', 'h')), versionKey(version('a', 'g')));
});

test('watchVersion: onUpdate once per new version, the DOM event, reload when hidden', () => {
  const WS = fakeWs();
  const target = new EventTarget();
  const dom = [];
  target.addEventListener('herald:update-available', (e) => dom.push(e.detail.next.current_image.sha256));
  const doc = new EventTarget();
  doc.visibilityState = 'visible';
  globalThis.document = doc;
  let reloads = 0;
  try {
    const updates = [];
    const w = watchVersion({
      url: 'http://h',
      deployment: 'shop/web',
      current: 'v1',
      onUpdate: (next, cur) => updates.push([next.current_image.sha256, cur]),
      autoReload: 'when-hidden',
      target,
      reload: () => reloads++,
      WebSocket: WS,
    });
    const s = WS.all[0];
    assert.equal(s.url, 'ws://h/ws?channel=k8s.deployment%3Ashop%3Aweb');
    s.open();
    s.frame(ev('0000000000000001', version('v1'), 'k8s.deployment:shop:web', 'version'));
    assert.deepEqual(updates, [], 'the loaded version is not an update');
    s.frame(ev('0000000000000002', version('v2'), 'k8s.deployment:shop:web', 'version'));
    s.frame(ev('0000000000000003', version('v2'), 'k8s.deployment:shop:web', 'version'));
    s.frame(ev('0000000000000004', version('v3'), 'k8s.deployment:shop:web', 'version'));
    assert.deepEqual(updates, [['v2', 'v1'], ['v3', 'v1']]);
    assert.deepEqual(dom, ['v2', 'v3']);
    assert.equal(reloads, 0);
    doc.visibilityState = 'hidden';
    doc.dispatchEvent(new Event('visibilitychange'));
    doc.dispatchEvent(new Event('visibilitychange'));
    assert.equal(reloads, 1);
    w.close();
    assert.equal(w.client.state, 'closed');
  } finally {
    delete globalThis.document;
  }
});

test('watchVersion without current takes the first version as the loaded one', () => {
  const WS = fakeWs();
  const updates = [];
  const w = watchVersion({ url: 'http://h', deployment: 'my.channel', onUpdate: (n) => updates.push(n), WebSocket: WS });
  WS.all[0].open();
  WS.all[0].frame(ev('0000000000000001', version('v1'), 'my.channel', 'version'));
  WS.all[0].frame(ev('0000000000000002', version('v1'), 'my.channel', 'version'));
  assert.equal(updates.length, 0);
  WS.all[0].frame(ev('0000000000000003', version('v2'), 'my.channel', 'version'));
  assert.equal(updates.length, 1);
  w.close();
});

test('a handler that throws does not stop the others', () => {
  const WS = fakeWs();
  const c = connect({ url: 'http://h', channels: ['a'], WebSocket: WS, transport: 'ws' });
  const got = [];
  const errors = [];
  c.on('herald.error', (e) => errors.push(e.message));
  c.on('message', () => {
    throw new Error('boom');
  });
  c.on('message', (e) => got.push(e.data));
  WS.all[0].open();
  WS.all[0].frame(ev('0000000000000001', 'x'));
  WS.all[0].frame({ type: 'error', error: 'bad request' });
  assert.deepEqual(got, ['x']);
  assert.deepEqual(errors, ['boom', undefined]);
  c.close();
});

test('the client is under 4 KiB minified and gzipped', async () => {
  const { transform } = await import('esbuild');
  const src = readFileSync(new URL('../herald.js', import.meta.url), 'utf8');
  const { code } = await transform(src, { minify: true, format: 'esm', target: 'es2020' });
  const size = gzipSync(code, { level: 9 }).length;
  console.log(`herald.js: ${src.length} B source, ${code.length} B minified, ${size} B minified+gzip`);
  assert.ok(size < 4096, `${size} B`);
});
