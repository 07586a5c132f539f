// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "le-redirect",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "LERedirect", targets: ["LERedirect"]),
        .executable(name: "le-redirect", targets: ["le-redirect"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // C layer: the system libraries, and a shim for what Swift cannot import.
        .systemLibrary(
            name: "CNetfilter",
            pkgConfig: "libnftnl",
            providers: [.apt(["libnftnl-dev", "libmnl-dev"])]
        ),
        .systemLibrary(
            name: "CIPTables",
            pkgConfig: "libiptc",
            providers: [.apt(["libiptc-dev"])]
        ),
        .target(name: "CLERedirectShim"),
        .systemLibrary(
            name: "CSeccomp",
            pkgConfig: "libseccomp",
            providers: [.apt(["libseccomp-dev"])]
        ),
        // The proxy process's confinement: privileges dropped, Landlock, seccomp (libseccomp).
        .target(name: "CLERedirectSandbox", dependencies: ["CSeccomp"]),

        // Pure Swift model: plans, journal, durations, errors, the backend protocol and its fake.
        .target(name: "LERedirectModel"),

        // Backends, state directory, session holder and the public API.
        .target(
            name: "LERedirect",
            dependencies: [
                "LERedirectModel", "CNetfilter", "CIPTables", "CLERedirectShim", "CLERedirectSandbox",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // The command line, as a library so that parsing is testable.
        .target(
            name: "LERedirectCLI",
            dependencies: [
                "LERedirect",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(name: "le-redirect", dependencies: ["LERedirectCLI", "LERedirect"]),

        // The README's library example, run by the integration tests.
        .executableTarget(name: "embedded-renewer-example", dependencies: ["LERedirect"], path: "Examples/EmbeddedRenewer"),

        .testTarget(name: "LERedirectModelTests", dependencies: ["LERedirectModel"]),
        .testTarget(name: "LERedirectTests", dependencies: ["LERedirect"]),
        .testTarget(name: "LERedirectCLITests", dependencies: ["LERedirectCLI"]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["le-redirect", "embedded-renewer-example"],
            exclude: [
                "Rulesets", "Support/peer.py", "Support/app.py", "Support/client.py", "Support/acme-client.sh",
                "Support/hook.sh", "Support/hostile.py",
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
