//! blocksmith filters.
