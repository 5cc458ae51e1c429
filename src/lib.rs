//! herald: a push hub. Apps publish events over HTTP; browsers subscribe to
//! named channels over Server-Sent Events or WebSocket.
//!
//! Code map (see ARCHITECTURE.md): [`hub`] is the transport-free core;
//! [`http`] adapts it to HTTP (SSE, WebSocket, publish, operations);
//! [`app`] composes everything and owns the shutdown; [`config`] is the
//! typed configuration; [`cli`] is the command line (including the
//! `publish` and `subscribe` clients); [`shutdown`] turns signals into
//! cancellation; [`bench`] is the load generator (`herald bench`);
//! [`k8s`] watches Kubernetes (Deployment versions, Events) and publishes
//! into the hub; [`cluster`] shares every channel between replicas.

pub mod app;
pub mod backplane;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod http;
pub mod hub;
pub mod k8s;
pub mod retry;
pub mod shutdown;
