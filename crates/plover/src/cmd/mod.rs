//! One module per command family: its arguments and its handler.

pub(crate) mod admin;
pub(crate) mod chat;
pub(crate) mod files;
pub(crate) mod groups;
pub(crate) mod messages;
pub(crate) mod nodes;
pub(crate) mod push;
pub(crate) mod receipts;
pub(crate) mod safety;
pub(crate) mod serve;
pub(crate) mod token;
