//! Compiles proto/ into Rust with the pure-Rust `protox` compiler: no system protoc needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["grpc_service.proto", "admin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads decode as `Bytes` slices of the request buffer: no copy.
        .bytes(".inference")
        // RPCs we do not serve (shared memory, tracing) answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
