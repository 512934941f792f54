// As `sqlx migrate build-script` generates it: `sqlx::migrate!` embeds the migrations at
// compile time, and on stable Rust cargo does not know to rebuild this crate when one is
// added.
fn main() {
    println!("cargo:rerun-if-changed=../schemas/migrations");
}
