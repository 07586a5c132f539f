import Glibc

/// Starts a detached-from-Swift-concurrency OS thread: the session holder's poll loop and blocking
/// work offloaded from async callers run there, never on the cooperative pool.
@discardableResult
func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Box: @unchecked Sendable {  // handed to exactly one thread, which consumes it
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    var thread = pthread_t()
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    let rc = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
        box.body()
        return nil
    }, box)
    precondition(rc == 0, "pthread_create: \(errnoText(rc))")
    return thread
}

/// Runs blocking work on its own thread and resumes the caller with its result.
func offload<T: Sendable, E: Error>(_ body: @escaping @Sendable () throws(E) -> T) async throws(E) -> T {
    let result: Result<T, E> = await withCheckedContinuation { continuation in
        let thread = startThread {
            continuation.resume(returning: Result { () throws(E) -> T in try body() })
        }
        pthread_detach(thread)
    }
    return try result.get()
}
