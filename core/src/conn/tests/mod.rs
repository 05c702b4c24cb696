//! Unit tests driving `Conn` as a client and a driver would, without sockets.

mod garbage;
mod handshake;
mod harness;
mod tls;
mod transmission;
mod units;
