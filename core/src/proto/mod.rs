//! NBD wire format: constants and a pure codec.
//!
//! - [`consts`]: every magic, option, reply, info, command, flag, chunk type and error value.
//! - [`codec`]: fixed-size header decoders, option data parsers, and encoders that append to a
//!   `Vec<u8>`. No IO, no state, no allocation from unchecked client lengths.

pub mod client;
pub mod codec;
pub mod consts;

pub use codec::*;
pub use consts::*;

#[cfg(test)]
mod tests;
