//! The event loops and the connection driver.
