import ImageFormats
import SystemIO

/// Re-verifies one cached file (blocking; run it on the jobs lane with its token).
///
/// A file stored as downloaded is hashed and compared with, in order: Glance's `os_hash_value`, Glance's md5
/// `checksum`, and the hash recorded when it was downloaded. A file with none of the three is not judged (the
/// scrub never deletes what it cannot check). A file converted on arrival (force_raw) is inspected again.
enum Scrubber {
    struct Outcome: Equatable {
        /// nil: nothing to compare with.
        var ok: Bool?
        var detail: String
    }

    static func verify(_ row: CachedImage, path: String, token: CancellationToken) throws -> Outcome {
        guard row.storedAsDownloaded else {
            let (v, _) = ImageInspector.inspect(path: path, declared: .raw)
            return v.safe ? Outcome(ok: true, detail: "inspection clean")
                : Outcome(ok: false, detail: v.reasons.map(\.description).joined(separator: "; "))
        }
        let expected: (algo: String, value: String, whose: String)
        if let v = row.osHashValue, !v.isEmpty {
            expected = (row.osHashAlgo ?? "sha512", v, "Glance recorded")
        } else if let md5 = row.checksum, !md5.isEmpty {
            expected = ("md5", md5, "Glance recorded")
        } else if let v = row.recordedHash, let a = row.recordedHashAlgo {
            expected = (a, v, "the download recorded")
        } else {
            return Outcome(ok: nil, detail: "no hash to compare with (Glance has none and none was recorded)")
        }
        let got = try FileHasher.hash(path, algorithm: expected.algo, token: token)
        return got == expected.value.lowercased()
            ? Outcome(ok: true, detail: "\(expected.algo) matches what \(expected.whose)")
            : Outcome(ok: false, detail: "\(expected.algo) is \(got), \(expected.whose) \(expected.value)")
    }
}
