// End-to-end: the demo page and herald-client in headless Chromium against
// a real `herald serve`. node --test e2e/  (scripts/test runs it)
//
// HERALD_BIN: the herald binary (default ../../target/debug/herald).
// CHROMIUM:   the browser (default /usr/bin/chromium).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const here = fileURLToPath(new URL('.', import.meta.url));
const BIN = process.env.HERALD_BIN || `${here}../../../target/debug/herald`;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.ARTIFACTS || `${here}artifacts`;
const missing = !existsSync(BIN) ? `no herald binary at ${BIN} (cargo build)` : !existsSync(CHROMIUM) ? `no Chromium at ${CHROMIUM} (apt-get install chromium)` : '';
if (missing) console.log(`# SKIPPED the browser tests: ${missing}`);
const run = promisify(execFile);

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function until(check, what, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

class Herald {
  constructor(port) {
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
  }
  async start() {
    this.proc = spawn(BIN, ['serve', '--listen', `127.0.0.1:${this.port}`, '--node-name', 'e2e', '--heartbeat', '2s', '--shutdown-grace', '2s'], {
      stdio: ['ignore', 'ignore', 'inherit'],
      env: { ...process.env, RUST_LOG: 'warn' },
    });
    this.exited = new Promise((r) => this.proc.once('exit', r));
    await until(async () => (await fetch(`${this.url}/healthz`)).ok, 'herald to start');
  }
  async stop() {
    this.proc.kill('SIGTERM');
    await this.exited;
  }
  publish(channel, data, ...flags) {
    return run(BIN, ['publish', '--url', this.url, ...flags, channel, data]);
  }
}

// A TCP proxy whose connections the test can cut and hold off.
class Proxy {
  constructor(target) {
    this.target = target;
    this.sockets = new Set();
    this.paused = false;
    this.server = net.createServer((client) => {
      if (this.paused) return client.destroy();
      const upstream = net.connect(target, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => {});
      }
      client.pipe(upstream).pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
  }
  listen() {
    return new Promise((r) => this.server.listen(0, '127.0.0.1', () => r((this.url = `http://127.0.0.1:${this.server.address().port}`))));
  }
  cut() {
    this.paused = true;
    for (const s of this.sockets) s.destroy();
  }
  resume() {
    this.paused = false;
  }
  close() {
    this.cut();
    this.server.close();
  }
}

let herald, browser;
before(async () => {
  if (missing) return;
  herald = new Herald(await freePort());
  await herald.start();
  const { chromium } = await import('playwright-core');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
  });
});
after(async () => {
  await browser?.close();
  await herald?.stop();
});

const items = (page) => page.$$eval('#events li[data-id]', (lis) => lis.map((li) => li.querySelector('code').textContent));
const waitOpen = (page) => page.waitForSelector('#state[data-state="open"]', { timeout: 20000 });

test('the demo page shows events published with herald publish', { skip: missing || false }, async () => {
  const page = await browser.newPage();
  await page.goto(herald.url + '/');
  await waitOpen(page);
  assert.equal(await page.title(), 'herald');
  await herald.publish('demo', 'hello from the CLI');
  await page.waitForSelector('#events li[data-id] >> text=hello from the CLI', { timeout: 20000 });
  // The page's own publish form, as JSON with an event name.
  await page.fill('#pub-event', 'greeting');
  await page.fill('#pub-data', '{"from": "the form"}');
  await page.check('#pub-json');
  await page.click('#pub button[type=submit]');
  await page.waitForSelector('#result >> text=Published', { timeout: 20000 });
  await page.waitForSelector('#events li[data-id] >> text={"from":"the form"}', { timeout: 20000 });
  // Subscribing from the page.
  await page.fill('#channel', 'second');
  await page.click('#sub button[type=submit]');
  await page.waitForSelector('.chip >> text=second');
  await until(async () => {
    await herald.publish('second', 'on the second channel');
    return (await items(page)).includes('on the second channel');
  }, 'an event on a channel subscribed from the page');
  await page.close();
});

test('the page reconnects by itself after herald restarts', { skip: missing || false }, async () => {
  const page = await browser.newPage();
  await page.goto(herald.url + '/?channels=restart');
  await waitOpen(page);
  await herald.stop();
  await page.waitForSelector('#state:not([data-state="open"])', { timeout: 20000 });
  await herald.start();
  await waitOpen(page);
  await herald.publish('restart', 'after the restart');
  await page.waitForSelector('#events li[data-id] >> text=after the restart', { timeout: 20000 });
  await page.close();
});

for (const transport of ['ws', 'sse']) {
  test(`a cut connection (${transport}) resumes with no loss and no duplicate`, { skip: missing || false }, async () => {
    const proxy = new Proxy(herald.port);
    await proxy.listen();
    const page = await browser.newPage();
    const channel = `cut-${transport}`;
    await page.goto(`${proxy.url}/?channels=${channel}&transport=${transport}`);
    await waitOpen(page);
    for (let i = 1; i <= 3; i++) await herald.publish(channel, `e${i}`);
    await until(async () => (await items(page)).length === 3, 'the first events');
    // Cut, and hold reconnects off while events are published.
    proxy.cut();
    await page.waitForSelector('#state:not([data-state="open"])', { timeout: 20000 });
    for (let i = 4; i <= 10; i++) await herald.publish(channel, `e${i}`);
    proxy.resume();
    await waitOpen(page);
    await until(async () => (await items(page)).length >= 10, 'the events published while cut');
    await herald.publish(channel, 'e11');
    await until(async () => (await items(page)).length >= 11, 'a live event after the resume');
    const want = Array.from({ length: 11 }, (_, i) => `e${i + 1}`);
    assert.deepEqual(await items(page), want);
    await page.close();
    proxy.close();
  });
}

test('a new version on a Deployment channel shows the banner (and the screenshot)', { skip: missing || false }, async () => {
  const channel = 'k8s.deployment:shop:web';
  const version = (n, sha) =>
    JSON.stringify({
      created_at: new Date().toISOString(),
      namespace: 'shop',
      name: 'web',
      current_image: { name: `registry.example/shop/web:${n}`, sha256: sha },
      images: [{ container: 'web', name: `registry.example/shop/web:${n}`, sha256: sha }],
      revision: n,
      pod_template_hash: `hash${n}`,
    });
  await herald.publish(channel, version(1, 'a1'), '--event', 'version', '--retain', '--json');
  const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
  await page.goto(herald.url + '/?deployment=shop/web');
  await waitOpen(page);
  // The loaded version is not news.
  await herald.publish('demo', 'a message on the demo channel');
  await page.waitForSelector('#events li[data-id] >> text=a message on the demo channel', { timeout: 20000 });
  assert.equal(await page.isVisible('#banner'), false);
  await herald.publish(channel, version(2, 'b2'), '--event', 'version', '--retain', '--json');
  await page.waitForSelector('#banner.shown', { timeout: 20000 });
  assert.match(await page.textContent('#banner-text'), /shop\/web is live: registry\.example\/shop\/web:2/);
  await herald.publish('demo', '{"orders": 3, "status": "shipped"}', '--json', '--event', 'order');
  await page.waitForSelector('#events li[data-id] >> text=shipped', { timeout: 20000 });
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: `${ARTIFACTS}/demo.png` });
  console.log(`# screenshot: ${ARTIFACTS}/demo.png`);
  await page.close();
});

test('the client works in Node with a passed WebSocket implementation', { skip: missing || false }, async () => {
  const { default: WebSocket } = await import('ws');
  const { connect } = await import('../herald.js');
  const client = connect({ url: herald.url, channels: ['node'], WebSocket });
  const got = [];
  client.on('message', (e) => got.push(e.data));
  await until(() => client.state === 'open', 'the connection');
  await until(async () => {
    await herald.publish('node', 'from node');
    return got.includes('from node');
  }, 'an event');
  client.close();
  assert.equal(client.state, 'closed');
});
