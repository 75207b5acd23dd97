import Glance
import Logging

/// Where cached images come from. The agent uses Glance; unit tests use a fake.
public protocol ImageSource: Sendable {
    func show(_ id: String) async throws -> GlanceImage
    /// `throttled`: a background fetch, subject to the prefetch bandwidth limit.
    func download(_ image: GlanceImage, into sink: any DownloadSink, throttled: Bool, progress: DownloadProgress?) async throws -> DownloadResult
    /// The Glance client behind this source, for the calls beyond show and download (copy-image, locations);
    /// nil for a source that is not Glance.
    var glance: GlanceClient? { get }
    /// Whether images from this source must match Glance's hashes (`[glance] verify_hash`); bytes read some other
    /// way (a Cinder volume) are held to the same rule.
    var verifiesHashes: Bool { get }
}

extension ImageSource {
    public var glance: GlanceClient? { nil }
    public var verifiesHashes: Bool { true }
}

/// Glance v2 as an image source, downloads verified and resumable.
public struct GlanceSource: ImageSource {
    public let client: GlanceClient
    public var verify: Bool
    public var retry: RetryPolicy
    /// The prefetch bandwidth limit, one for all throttled downloads of this source together.
    public let limit: BandwidthLimit?

    public init(client: GlanceClient, verify: Bool = true, retry: RetryPolicy = RetryPolicy(), bytesPerSecond: UInt64? = nil) {
        self.client = client
        self.verify = verify
        self.retry = retry
        self.limit = bytesPerSecond.map { BandwidthLimit(bytesPerSecond: $0) }
    }

    public func show(_ id: String) async throws -> GlanceImage { try await client.show(id) }

    public var glance: GlanceClient? { client }

    public var verifiesHashes: Bool { verify }

    public func download(_ image: GlanceImage, into sink: any DownloadSink, throttled: Bool,
                         progress: DownloadProgress?) async throws -> DownloadResult {
        try await VerifiedDownload(client: client, image: image, verify: verify, retry: retry,
                                   limit: throttled ? limit : nil, progress: progress).run(into: sink)
    }
}
