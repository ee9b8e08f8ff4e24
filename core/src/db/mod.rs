//! The PostgreSQL layer.

pub mod config;
pub mod migrate;
pub mod repository;
mod translate;
