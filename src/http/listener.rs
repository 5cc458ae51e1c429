//! The client's address, as handlers see it (`ConnectInfo<Peer>`).

use std::net::SocketAddr;

/// The client's address. The accept loop inserts it into every request.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);
