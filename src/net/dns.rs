//! DNS stub (in progress).
