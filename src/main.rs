//! nri-identity-injector: delivers SPIFFE identities into annotated containers through NRI.

fn main() {
    println!("nri-identity-injector {}", env!("CARGO_PKG_VERSION"));
}
