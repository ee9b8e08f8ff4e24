//! The PostgreSQL layer.

pub mod config;
pub mod feed;
pub mod groups;
mod feed_plan;
mod json;
pub mod legacy;
pub mod migrate;
pub mod replay;
pub mod repository;
pub mod retention;
pub(crate) mod sql;
mod translate;
