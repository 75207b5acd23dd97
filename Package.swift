// swift-tools-version: 6.1
// imgconv: native, safe disk-image inspection and conversion for OpenStack compute nodes.
//
// Layering (arrows point one way):
//   imgconv (CLI) -> Convert -> ImageFormats; `imgconv agent|cache|disk` exec imgconv-agent:
//   imgconv-agent -> Agent -> Disks -> RBD -> CCeph (librbd, librados, loaded on first use)
//                            Disks -> Cache -> Glance (AsyncHTTPClient), Convert -> ImageFormats -> CZlib/CZstd/CDeflate
//   and at the bottom SystemIO (syscall wrappers, output files, the blocking executor), under all of them.
// ImageFormats depends on no networking, Ceph or daemon code so it can be fuzzed and reused.
import Foundation
import PackageDescription

let gnuSource: [SwiftSetting] = [.unsafeFlags(["-Xcc", "-D_GNU_SOURCE"])]

let package = Package(
    name: "imgconv",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ImageFormats", targets: ["ImageFormats"]),
        .library(name: "Convert", targets: ["Convert"]),
        .executable(name: "imgconv", targets: ["imgconv"]),
        .executable(name: "imgconv-agent", targets: ["imgconv-agent"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", exact: "4.5.2"),
        .package(url: "https://github.com/swift-server/async-http-client.git", exact: "1.37.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", exact: "2.28.1"),
        .package(url: "https://github.com/groue/GRDB.swift.git", exact: "7.10.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", exact: "2.13.0"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .systemLibrary(name: "CDeflate", path: "Sources/CDeflate"),
        // librados + librbd (headers from Debian librados-dev, librbd-dev), loaded with dlopen on first use: commands
        // that never touch Ceph do not pay for them (Sources/CCeph/include/CCeph.h).
        .target(name: "CCeph", path: "Sources/CCeph"),
        // The system libcrypto (Debian libssl-dev), for image digests only.
        .systemLibrary(name: "CLibCrypto", path: "Sources/CLibCrypto"),
        // Thin typed wrappers over the system calls everything above makes: output files (explicit modes, fsync and
        // rename), file-system helpers, and the executor that keeps blocking work off actors and the cooperative pool.
        .target(name: "SystemIO", cSettings: [.define("_GNU_SOURCE")], swiftSettings: gnuSource),
        .target(
            name: "ImageFormats",
            dependencies: ["SystemIO", "CZlib", "CZstd", "CDeflate"],
            cSettings: [.define("_GNU_SOURCE")],
            swiftSettings: gnuSource
        ),
        .target(
            name: "Convert",
            dependencies: ["SystemIO", "ImageFormats", "CZlib", "CZstd", "CDeflate", .product(name: "Logging", package: "swift-log")],
            swiftSettings: gnuSource
        ),
        // Glance v2 + Keystone v3 client: networking lives here, never in ImageFormats or Convert.
        .target(
            name: "Glance",
            dependencies: [
                "CLibCrypto", "SystemIO",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The node's verified image cache: SQLite index, single-flight fetches, eviction, scrub.
        .target(
            name: "Cache",
            dependencies: [
                "SystemIO", "Glance", "Convert", "ImageFormats",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            cSettings: [.define("_GNU_SOURCE")],
            swiftSettings: gnuSource
        ),
        // Typed Swift over librados/librbd: connect, images, aio writes, snapshots, clones, leases.
        .target(name: "RBD", dependencies: ["CCeph", "SystemIO", "ImageFormats"]),
        // Instance boot disks: RBD clones (from Glance's own rbd location, or from a shared base built once per
        // image, cluster-wide) and local qcow2 overlays on a raw base.
        .target(
            name: "Disks",
            dependencies: [
                "SystemIO", "RBD", "Cache", "Convert", "Glance", "ImageFormats",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: gnuSource
        ),
        // The daemon: config, prefetch loop, HTTP control API on a Unix socket.
        .target(
            name: "Agent",
            dependencies: [
                "SystemIO", "Cache", "Glance", "Disks", "RBD",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: gnuSource
        ),
        // The CLI: formats only (info, map, check, convert). `imgconv agent|cache|disk` exec imgconv-agent, so a
        // conversion maps none of the agent's code (peak RSS 23 MiB instead of 35).
        .executableTarget(
            name: "imgconv",
            dependencies: [
                "ImageFormats", "Convert",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: gnuSource
        ),
        // The agent and the commands that talk to it.
        .executableTarget(
            name: "imgconv-agent",
            dependencies: [
                "ImageFormats", "Agent", "Cache", "Glance",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: gnuSource
        ),
        .target(name: "FuzzKit", dependencies: ["ImageFormats"]),
        .testTarget(name: "ImageFormatsTests", dependencies: ["ImageFormats", "FuzzKit"]),
        .testTarget(name: "ConvertTests", dependencies: ["Convert", "ImageFormats"]),
        .testTarget(name: "SystemIOTests", dependencies: ["SystemIO"]),
        .testTarget(name: "imgconvTests", dependencies: ["Convert", "ImageFormats", "imgconv", "ImageFixture"]),
        // Test support: the real Keystone/Glance fixture (scripts/openstack-fixture.sh) and the misbehaving proxy.
        .target(
            name: "OpenStackFixture",
            dependencies: [.product(name: "AsyncHTTPClient", package: "async-http-client")],
            path: "Tests/OpenStackFixture"
        ),
        .testTarget(name: "GlanceTests", dependencies: ["Glance", "OpenStackFixture", .product(name: "Crypto", package: "swift-crypto")]),
        // Test support: large images made in milliseconds (a compressed qcow2 of one repeated cluster).
        .target(name: "ImageFixture", dependencies: ["CZlib"], path: "Tests/ImageFixture"),
        .testTarget(name: "CacheTests", dependencies: ["Cache", "Glance", "ImageFormats", "ImageFixture"]),
        .target(name: "CephFixture", dependencies: ["RBD"], path: "Tests/CephFixture"),
        .testTarget(name: "RBDTests", dependencies: ["RBD", "CephFixture"]),
        .testTarget(name: "DisksTests", dependencies: ["Disks", "RBD", "Cache", "Convert", "ImageFormats", "Glance", "CephFixture", "OpenStackFixture", "ImageFixture"]),
        .testTarget(name: "AgentTests", dependencies: ["Agent", "Cache", "Glance", "OpenStackFixture", "CephFixture", "RBD", "imgconv", "imgconv-agent", "ImageFixture"]),
    ]
)

// libFuzzer harnesses (fuzz/run.sh sets IMGCONV_FUZZ=1): executables without a main, which only link with
// -sanitize=fuzzer, so ordinary builds leave them out.
if ProcessInfo.processInfo.environment["IMGCONV_FUZZ"] == "1" {
    for name in ["FuzzQCOW2", "FuzzVMDK", "FuzzVPC", "FuzzVDI", "FuzzDetect"] {
        package.targets.append(.executableTarget(name: name, dependencies: ["FuzzKit", "ImageFormats"]))
    }
}
