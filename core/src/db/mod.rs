//! The PostgreSQL layer.

pub mod config;
pub(crate) mod conn;
pub mod erasure;
pub mod feed;
mod feed_plan;
pub mod groups;
mod json;
pub mod legacy;
pub mod migrate;
pub mod replay;
pub mod repository;
pub mod retention;
pub(crate) mod sql;
mod translate;
