//! blocksmith backends.
