// swift-tools-version: 6.1
// imgconv: native, safe disk-image inspection and conversion for OpenStack compute nodes.
//
// Layering (arrows point one way):  imgconv (CLI) -> Convert -> ImageFormats -> CZlib/CZstd
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
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .systemLibrary(name: "CDeflate", path: "Sources/CDeflate"),
        .target(
            name: "ImageFormats",
            dependencies: ["CZlib", "CZstd", "CDeflate"],
            cSettings: [.define("_GNU_SOURCE")],
            swiftSettings: gnuSource
        ),
        .target(
            name: "Convert",
            dependencies: ["ImageFormats", "CZlib", "CZstd", "CDeflate", .product(name: "Logging", package: "swift-log")],
            swiftSettings: gnuSource
        ),
        .executableTarget(
            name: "imgconv",
            dependencies: [
                "ImageFormats", "Convert",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: gnuSource
        ),
        .target(name: "FuzzKit", dependencies: ["ImageFormats"]),
        .testTarget(name: "ImageFormatsTests", dependencies: ["ImageFormats", "FuzzKit"]),
        .testTarget(name: "ConvertTests", dependencies: ["Convert", "ImageFormats"]),
        .testTarget(name: "imgconvTests", dependencies: ["Convert", "ImageFormats", "imgconv"]),
    ]
)

// libFuzzer harnesses (fuzz/run.sh sets IMGCONV_FUZZ=1): executables without a main, which only link with
// -sanitize=fuzzer, so ordinary builds leave them out.
if ProcessInfo.processInfo.environment["IMGCONV_FUZZ"] == "1" {
    for name in ["FuzzQCOW2", "FuzzVMDK", "FuzzVPC", "FuzzVDI", "FuzzDetect"] {
        package.targets.append(.executableTarget(name: name, dependencies: ["FuzzKit", "ImageFormats"]))
    }
}
