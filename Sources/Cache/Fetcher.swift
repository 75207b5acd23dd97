import Convert
import Glance
import ImageFormats
import Logging
import SystemIO

/// One image from Glance into the cache directory, up to the moment it can be published: downloaded under a
/// temporary name (hashes checked in the same pass, the first block checked against the declared format),
/// inspected, and converted to raw when force_raw asks. Every blocking step runs on the executor; the caller (the
/// cache actor) decides about space and publishes (`Fetched.commit`).
struct Fetcher: Sendable {
    let config: CacheConfig
    let source: any ImageSource
    let logger: Logger

    /// A verified, inspected file not yet in place.
    final class Fetched: @unchecked Sendable {
        let file: OutputFile
        /// The image opened on the temporary file (what force_raw converts).
        let image: any DiskImage
        let download: DownloadResult
        init(file: OutputFile, image: any DiskImage, download: DownloadResult) {
            self.file = file
            self.image = image
            self.download = download
        }

        /// Removes the temporary file (any failure after the download, a cancellation included).
        func discard() async { await cleanup { self.file.discard() } }
    }

    func finalPath(_ id: String) -> String { config.directory + "/" + config.fileName(for: id) }

    /// Downloads and inspects. The temporary file is removed on any failure (and on cancellation).
    func download(_ image: GlanceImage, declared: ImageFormat, throttled: Bool, progress: DownloadProgress?,
                  verifying: @Sendable () async -> Void) async throws -> Fetched {
        let id = image.id
        let file = OutputFile(path: finalPath(id), mode: config.fileMode)
        do { try await offload { try file.create() } } catch { throw CacheError.io("\(error)") }
        do {
            let sink = FileDownloadSink(file: file, declared: declared, imageID: id)
            let result: DownloadResult
            do {
                result = try await source.download(image, into: sink, throttled: throttled, progress: progress)
            } catch let e as GlanceError {
                throw CacheError.upstream(e)
            }
            await verifying()
            // The whole image is here and its hashes matched: inspect it before anything else reads it.
            guard let tmp = file.temporaryPath else { throw CacheError.io("the download of \(id) has no temporary file") }
            let (verdict, opened) = try await offload(.jobs) { ImageInspector.inspect(path: tmp, declared: declared) }
            guard verdict.safe, let opened else { throw CacheError.unsafe(id: id, reasons: verdict.reasons.map(\.description)) }
            return Fetched(file: file, image: opened, download: result)
        } catch {
            await cleanup { file.discard() }
            throw error
        }
    }

    /// Bytes force_raw's output will occupy: the data extents (holes stay holes).
    func rawDataBytes(_ fetched: Fetched) async throws -> UInt64 {
        let image = fetched.image
        return try await offload(.jobs) {
            (try? image.allExtents().filter { $0.status == .data }.reduce(UInt64(0)) { $0 + $1.length }) ?? image.virtualSize
        }
    }

    /// force_raw: converts the inspected download to a raw file at the final path (the converter writes it under
    /// its own temporary name, fsyncs and renames), then drops the download. Cancellable between windows.
    func convertToRaw(_ fetched: Fetched, id: String) async throws {
        let path = finalPath(id), mode = config.fileMode
        do {
            try await offload(.jobs) { token in
                let out = RawFileSink(path: path, mode: mode)
                out.outputFile?.direct = true
                do {
                    _ = try Converter(options: .background, cancel: { token.isCancelled }).convert(fetched.image, to: out)
                } catch SinkError.cancelled {
                    throw CancellationError()
                }
            }
        } catch is CancellationError {
            await fetched.discard()
            throw CancellationError()
        } catch {
            await fetched.discard()
            throw CacheError.io("converting \(id) to raw: \(error)")
        }
        await fetched.discard()
    }

    /// Publishes the download as it is: fsync, rename into place, fsync the directory.
    func commit(_ fetched: Fetched) async throws {
        do {
            try await offload { try fetched.file.commit() }
        } catch {
            await fetched.discard()
            throw CacheError.io("\(error)")
        }
    }
}
