//! Money: prices and the exact-decimal cost of an attempt. (Budgets and reservations build on
//! this.)

pub mod pricing;
