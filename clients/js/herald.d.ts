// Types of herald-client (herald.js).

/** Connection state. */
export type State = 'connecting' | 'open' | 'closed';

/** An event as delivered to handlers. */
export interface HeraldEvent<T = unknown> {
  /** The event id ('' for herald.reset); the client resumes after it. */
  id: string;
  /** The event name ('message' unless the publisher chose one). */
  event: string;
  /** The channel (always over WebSocket; over SSE only with one channel). */
  channel?: string;
  /** The payload: JSON as published, else the text. */
  data: T;
  /** The payload as text. */
  text: string;
}

export interface ConnectOptions {
  /** herald's base URL, such as https://push.example.com (default: the page's origin). */
  url?: string;
  /** Channels to subscribe to. */
  channels?: string[];
  /** 'auto' (default) uses WebSocket when there is one, else SSE. */
  transport?: 'sse' | 'ws' | 'auto';
  /** Resume after this id on the first connect. */
  lastEventId?: string;
  /** Backoff: the first cap and the largest delay, in ms (default 500 and 30000). */
  minDelay?: number;
  maxDelay?: number;
  /** Implementations for runtimes without globals (Node 20: pass `ws`). */
  WebSocket?: unknown;
  EventSource?: unknown;
}

export interface Client {
  /** The current state. */
  readonly state: State;
  /** The last event id seen. */
  readonly lastEventId: string;
  /** The channels subscribed to. */
  readonly channels: string[];
  /**
   * Adds a handler: an event name ('message', 'version', ...), '*' for every
   * event, or the client's own: 'herald.state' (a State), 'herald.reset'
   * (history did not reach back to the last id: the event says which
   * channel), 'herald.error', 'herald.subscribed', 'herald.unsubscribed'
   * (WebSocket replies). Over SSE, '*' sees 'message' and the names you
   * registered with on() (EventSource delivers only named listeners).
   */
  on(name: '*' | string, handler: (event: HeraldEvent) => void): Client;
  on(name: 'herald.state', handler: (state: State) => void): Client;
  off(name: string, handler: (...args: any[]) => void): Client;
  /** Subscribes (SSE: reconnects with the new set, resuming from the last id). */
  subscribe(channel: string): Client;
  unsubscribe(channel: string): Client;
  /** Closes for good. */
  close(): void;
}

export function connect(options: ConnectOptions): Client;

/** A version as herald announces a Deployment's (or anything published as event 'version'). */
export interface Version {
  created_at?: string;
  namespace?: string;
  name?: string;
  current_image?: { name: string; sha256: string };
  previous_image?: { name: string; sha256: string };
  images?: { container: string; name: string; sha256: string }[];
  revision?: number | null;
  pod_template_hash?: string;
  [key: string]: unknown;
}

export interface WatchVersionOptions extends ConnectOptions {
  /** 'NAMESPACE/NAME' of a Deployment, or a channel name. */
  deployment: string;
  /**
   * The loaded build: an image digest, image name, build id or template
   * hash it matches; a version object; or a predicate. Left out, the first
   * version announced is taken as the loaded one.
   */
  current?: string | Version | ((v: Version) => boolean);
  /** Called once per new version. */
  onUpdate?: (next: Version, current: unknown) => void;
  /** 'when-hidden': reload the tab the next time it is hidden. */
  autoReload?: false | 'when-hidden';
  /** Where 'herald:update-available' is dispatched (default: window). */
  target?: EventTarget;
  /** Reload function (default: location.reload()). */
  reload?: () => void;
  /** An existing client to use instead of opening one. */
  client?: Client;
}

export function watchVersion(options: WatchVersionOptions): { client: Client; close(): void };

/** Reconnect delay for attempt n (0-based): random in [0, min(maxDelay, minDelay * 2^n)). */
export function backoffDelay(attempt: number, options?: { minDelay?: number; maxDelay?: number }, random?: () => number): number;

/** The identity of a version (images and template hash, else its JSON). */
export function versionKey(v: unknown): string;

/** True if an announced version is the loaded build. */
export function isCurrent(v: unknown, current: unknown): boolean;
