//! Rebuilds the crate when a migration is added or changed. `sqlx::migrate!()` embeds
//! `migrations/` at compile time, and Cargo reruns the macro only when a Rust source changes,
//! so without this a new migration file alone leaves the binaries and tests on the old list.
//! This is the build script sqlx recommends (`sqlx migrate build-script`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
