//! NBD wire format: constants and a pure codec.
