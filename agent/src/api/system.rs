//! `/_ping` and `/version`, which every Docker client calls before anything else.

use axum::{
    http::{header, HeaderName, HeaderValue},
    response::IntoResponse,
    Json,
};
use shoal_api::system::{Version, API_VERSION, MIN_API_VERSION};

/// `OK` plus the headers the CLI negotiates with; without `Api-Version` it falls back to 1.24.
pub async fn ping() -> impl IntoResponse {
    let h = |name: &'static str, value: &'static str| {
        (
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    };
    (
        [
            h("api-version", API_VERSION),
            h("ostype", "linux"),
            // Swarm mode arrives with the control plane; until then this node is standalone.
            h("swarm", "inactive"),
            h("docker-experimental", "false"),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store, must-revalidate"),
            ),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        "OK",
    )
}

pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_version: API_VERSION.to_owned(),
        min_api_version: MIN_API_VERSION.to_owned(),
        os: std::env::consts::OS.to_owned(),
        arch: docker_arch().to_owned(),
        kernel_version: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

/// Go's GOARCH names, which Docker reports.
fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
