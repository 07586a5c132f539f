import CLERedirectShim
import CNetfilter
import Glibc
import LERedirectModel
import Logging
import Synchronization

/// The validation proxy: serves the listeners on the proxy port (IPv4 and IPv6) that the session
/// holder bound and handed over, answers ACME challenges from the session's challenge source, and
/// relays everything else, bytes unchanged, to where each connection was going before the
/// redirect. It runs in a process of its own (`ProxyProcess`), unprivileged and confined, on that
/// process's main thread: one epoll loop, whose other input is the holder's socket (`Message`s:
/// tokens, status, drain, stop; its end is the holder's death). A connection holds buffers only
/// while a socket cannot keep up (and its source is not read meanwhile).
final class ValidationProxy {
    let options: ProxyOptions
    let redirectedPort: UInt16
    let proxyPort: UInt16
    let counters = ProxyCounters()
    let tokens = ChallengeStore()
    /// Who may answer challenges through a listener on this host (the challenge port's server).
    let listenerOwners: ListenerOwners
    private let logger: Logger

    private var epoll: Int32 = -1
    private var listeners: [Int32]
    /// The session holder's end of their socket pair.
    private let holder: MessageChannel
    private var challengeUpstream: le_endpoint?
    /// The challenge source's listener is on this host: its owner is checked per connection.
    private var challengeListenerIsLocal = false
    private var webroot: Webroot?
    /// sock_diag, opened when first needed: who owns the socket a challenge connection reached.
    private var diag: NetlinkSocket?
    /// Connections held per client address (--max-connections-per-source).
    private var perSource: [SourceAddress: Int] = [:]
    private var lastSourceWarning: Int64 = -(1 << 40)

    private var drainTimeoutOverride: Duration?

    // The loop's own state.
    private var slots: [Relay?] = []
    private var freeSlots: [Int] = []
    private var generation: UInt32 = 0
    private var now: Int64 = 0
    private var draining = false
    private var drainDeadline: Int64 = .max
    private var drainTimedOut = false
    private var listenersCloseAt: Int64 = .max
    /// When listening resumes after the process ran out of descriptors (accept failed with EMFILE).
    private var listenersResumeAt: Int64 = .max
    private var lastDescriptorWarning: Int64 = -(1 << 40)  // long ago, and `now - it` cannot overflow
    /// --max-connections, or fewer when the process's descriptor limit allows fewer (two per connection).
    private var connectionLimit = 0
    /// The descriptor limit the proxy started with.
    private var descriptorLimit: rlim_t = 0

    private func descriptorLimitLowered() -> Bool {
        var limit = rlimit()
        return getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 && limit.rlim_cur < descriptorLimit
    }
    private var listening = true
    private var scratch = UnsafeMutableRawPointer.allocate(byteCount: ValidationProxy.readSize, alignment: 16)

    static let readSize = 64 * 1024
    /// While draining, a keep-alive connection that sends nothing for this long is closed.
    static let drainIdleGrace: Int64 = 1000
    /// The drain timeout ends opaque and upgraded streams, idle keep-alive connections and clients
    /// still sending a request (`Relay.endsAtDrainTimeout`); a request already sent and being
    /// answered, and a connection taken from the accept queue as the listeners closed (its first
    /// request on the way), may take this much longer, so that ending never cuts a response short.
    static let responseGrace: Int64 = 30_000
    /// After a last response, how long unread client bytes are read and dropped (so that closing
    /// never turns into a reset that destroys the response in the client's receive buffer).
    static let lingerTime: Int64 = 2000

    /// Connections taken from the listeners that the steering sent (refused ones included).
    private var steeredTaken: UInt64 = 0
    /// Set by the holder's `drain`: the steering's packet count once it stopped.
    private var steeredExpected: UInt64?
    /// How the loop ended.
    enum Outcome {
        /// Drained: the holder was told (`drained`).
        case drained
        /// The holder said stop.
        case stopped
        /// The holder's socket closed: it died, so nothing steers here any more.
        case holderGone
        case failed
    }
    private var outcome: Outcome?

    /// `listeners`: bound, listening and transparent, from the holder; `holder`: the socket to it.
    init(
        options: ProxyOptions, redirectedPort: UInt16, proxyPort: UInt16, listeners: [Int32], holder: MessageChannel,
        listenerOwners: ListenerOwners = ListenerOwners([]), logger: Logger
    ) {
        self.options = options
        self.redirectedPort = redirectedPort
        self.proxyPort = proxyPort
        self.listeners = listeners
        self.holder = holder
        self.listenerOwners = listenerOwners
        self.logger = logger
    }

    deinit {
        scratch.deallocate()
    }

    // MARK: Life cycle (in the proxy process)

    /// What needs the file system and the resolver: done before the process confines itself.
    /// Throws with nothing left open but the listeners (the caller's).
    func prepare() throws(LERedirectError) {
        connectionLimit = options.maxConnections
        var limit = rlimit()
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 { descriptorLimit = limit.rlim_cur }
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 && limit.rlim_cur != rlim_t.max {
            let affordable = max(16, (Int(limit.rlim_cur) - 128) / 2)
            if affordable < connectionLimit {
                logger.notice(
                    "the descriptor limit (\(limit.rlim_cur)) allows \(affordable) proxied connections at once, fewer than --max-connections \(options.maxConnections)")
                connectionLimit = affordable
            }
        }
        switch options.challenge {
        case .url(let host, let port):
            let upstream = try Self.resolve(host, port)
            challengeUpstream = upstream
            challengeListenerIsLocal = upstream.isLoopback || upstream.isUnspecified || Self.isLocal(upstream)
        case .port:
            challengeListenerIsLocal = true
        case .webroot, .memory, .stateless:
            break
        }
        epoll = le_epoll_create()
        guard epoll >= 0 else {
            let code = errno
            throw LERedirectError(.failed, "starting the validation proxy: epoll_create: \(errnoText(code))", errno: code)
        }
        for (i, fd) in listeners.enumerated() {
            _ = le_epoll_ctl(epoll, Epoll.add, fd, Epoll.readable, EventTag.listener(i).rawValue)
        }
        _ = le_epoll_ctl(epoll, Epoll.add, holder.fd, Epoll.readable, EventTag.holder.rawValue)
    }

    /// Opens the webroot as the proxy's own user (after the privileges are gone, before the file
    /// system is closed to it): the directory, or nil when the source is not a webroot. `group`:
    /// the webroot's group as the holder saw it when it gave the proxy that group; the directory
    /// opened must still have it (a path swapped in between gets nothing).
    func openWebroot(group: UInt32?) throws(LERedirectError) -> Int32? {
        guard case .webroot(let dir) = options.challenge else { return nil }
        let opened = try Webroot(dir)
        if let group, opened.group != group {
            throw LERedirectError(
                .failed, "--webroot \(dir): its group changed (gid \(group), now \(opened.group)) while the session began. Nothing was changed")
        }
        webroot = opened
        return opened.directoryDescriptor
    }

    /// The TCP ports the proxy connects to: the steered port (every relayed connection goes to
    /// its original destination, on that port) and the challenge source's.
    var connectPorts: [UInt16] {
        var ports = [redirectedPort]
        switch options.challenge {
        case .port(let port), .url(_, let port): if port != redirectedPort { ports.append(port) }
        case .webroot, .memory, .stateless: break
        }
        return ports
    }

    /// The counters, as the holder's `status` asks for them.
    var status: ProxyStatus {
        func value(_ counter: borrowing Atomic<Int>) -> UInt64 { UInt64(max(0, counter.load(ordering: .relaxed))) }
        var s = ProxyStatus()
        s.phase = ProxyPhase(rawValue: UInt8(counters.phase.load(ordering: .relaxed))) ?? .done
        s.connections = value(counters.connections)
        s.accepted = value(counters.accepted)
        s.requests = value(counters.requests)
        s.challenges = value(counters.challenges)
        s.bytesIn = value(counters.bytesFromClients)
        s.bytesOut = value(counters.bytesToClients)
        s.refused = value(counters.refused)
        s.errors = value(counters.proxyErrors)
        return s
    }

    private func closeAll() {
        for fd in listeners { closeDescriptor(fd) }
        listeners = []
        if epoll >= 0 { closeDescriptor(epoll) }
        epoll = -1
        diag?.close()
        diag = nil
        webroot = nil
    }

    // MARK: The holder's messages

    /// Answers what the holder sent; a closed socket means the holder is gone.
    private func serveHolder() {
        let message: Message
        do { message = try holder.receive(timeout: .seconds(5)) } catch {
            if case .closed = error {
                logger.error("the session holder is gone; the proxy closes its connections and exits")
                outcome = .holderGone
            } else {
                logger.error("the session holder's message: \(holder.describe(error, answering: .statusRequest).message); the proxy exits")
                outcome = .failed
            }
            return
        }
        var answer: Message?
        switch message {
        case .challengeAdd(let token, let keyAuthorization):
            answer = .tokensHeld(tokens.add(token, keyAuthorization))
        case .challengeRemove(let token):
            answer = .tokensHeld(tokens.remove(token).remaining)
        case .statusRequest:
            answer = .proxyStatus(status)
        case .drain(let timeout, let steered):
            drainTimeoutOverride = timeout
            steeredExpected = steered
            startDrain()
        case .stop:
            outcome = .stopped
        default:
            answer = .failure(LERedirectError(.failed, "the proxy does not take '\(message.name)'"))
        }
        if let answer { reply(answer) }
    }

    private func reply(_ message: Message) {
        do { try holder.send(message) } catch {
            logger.error("answering the session holder: \(error); the proxy exits")
            outcome = .failed
        }
    }

    private static func resolve(_ host: String, _ port: UInt16) throws(LERedirectError) -> le_endpoint {
        var hints = addrinfo()
        hints.ai_socktype = 1  // SOCK_STREAM
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, "\(port)", &hints, &result)
        guard rc == 0, let first = result else {
            throw LERedirectError(
                .invalidArgument, "--challenge-url: cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(result) }
        var endpoint = le_endpoint()
        endpoint.family = first.pointee.ai_family
        endpoint.port = port
        withUnsafeMutableBytes(of: &endpoint.addr) { out in
            if first.pointee.ai_family == AF_INET6 {
                first.pointee.ai_addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { a in
                    withUnsafeBytes(of: a.pointee.sin6_addr) { out.copyMemory(from: $0) }
                    endpoint.scope_id = a.pointee.sin6_scope_id  // fe80::1%eth0
                }
            } else {
                first.pointee.ai_addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { a in
                    withUnsafeBytes(of: a.pointee.sin_addr) { out.copyBytes(from: $0) }
                }
            }
        }
        return endpoint
    }

    // MARK: The loop

    /// Serves until drained, stopped, or the holder is gone.
    func run() -> Outcome {
        var events = [le_event](repeating: le_event(), count: 256)
        var nextSweep: Int64 = 0
        now = monotonicMilliseconds()
        loop: while true {
            let n = events.withUnsafeMutableBufferPointer { le_epoll_wait(epoll, $0.baseAddress, 256, 250) }
            now = monotonicMilliseconds()
            if n < 0 && errno != EINTR {
                logger.error("the validation proxy's epoll_wait failed: \(errnoText(errno)); closing its connections")
                break
            }
            var i = 0
            while i < n {
                let event = events[i]
                i += 1
                switch EventTag(rawValue: event.data) {
                case .holder:
                    serveHolder()
                    if outcome != nil { break loop }
                case .listener(let index):
                    if index < listeners.count { acceptConnections(listeners[index]) }
                case .connection(let slot, let generation, let upstream):
                    guard slot < slots.count, let relay = slots[slot], relay.generation == generation else {
                        continue  // closed earlier in this batch
                    }
                    handle(relay, upstreamSide: upstream, events: event.events)
                }
            }
            if outcome != nil { break }
            if now >= nextSweep {
                nextSweep = now + 250
                sweep()
            }
            if !listening && !draining && now >= listenersResumeAt {
                listenersResumeAt = .max
                resumeListening()
            }
            if draining {
                if listening || !listeners.isEmpty,
                    now >= listenersCloseAt || steeredExpected.map({ steeredTaken >= $0 }) == true
                {
                    closeListeners()
                }
                if listeners.isEmpty && counters.connections.load(ordering: .relaxed) == 0 { break }
                if now >= drainDeadline && !drainTimedOut {
                    drainTimedOut = true
                    for case let relay? in slots where relay.endsAtDrainTimeout { close(relay) }
                }
                if now >= drainDeadline + Self.responseGrace {
                    let left = counters.connections.load(ordering: .relaxed)
                    if left > 0 { logger.notice("drain: closing \(left) connection(s) still busy after the drain timeout and \(Self.responseGrace / 1000) s more") }
                    closeListeners()
                    break
                }
            }
        }
        for case let relay? in slots { close(relay) }
        closeAll()
        counters.phase.store(2, ordering: .relaxed)
        if outcome == nil {
            outcome = draining ? .drained : .failed
            if draining { reply(.drained(status)) }
        }
        return outcome ?? .failed
    }

    private func startDrain() {
        guard !draining else { return }
        draining = true
        counters.phase.store(1, ordering: .relaxed)
        let timeout = drainTimeoutOverride ?? options.drainTimeout
        drainDeadline = now + min(max(timeout.milliseconds, 0), 3_600_000)  // as --drain-timeout's range
        // Connections steered just before the steering went may still be completing their handshake
        // or waiting in the accept queue: the listeners stay until all of them were taken (the
        // steering's counter says how many there were), or a second at most.
        listenersCloseAt = min(drainDeadline, now + 1000)
        logger.info("draining", metadata: ["connections": "\(counters.connections.load(ordering: .relaxed))"])
        for case let relay? in slots { applyDrain(relay) }
    }

    private func closeListeners() {
        // Take what is already queued first: those connections were steered before the steering
        // went. The whole queue, not one batch of it (the connection limit aside).
        for fd in listeners {
            while acceptConnections(fd) > 0 {}
        }
        for fd in listeners { closeDescriptor(fd) }
        listeners = []
        listening = false
    }

    // MARK: Accepting

    /// Takes up to 64 connections from `listener`; returns how many it took (0 once the queue is
    /// empty or the connection limit is reached).
    @discardableResult
    private func acceptConnections(_ listener: Int32) -> Int {
        var peer = le_endpoint()
        var taken = 0
        for _ in 0..<64 {
            if counters.connections.load(ordering: .relaxed) >= connectionLimit {
                pauseListening()
                return taken
            }
            let fd = le_tcp_accept(listener, &peer)
            if fd < 0 {
                let code = errno
                if code == EMFILE, descriptorLimitLowered() {
                    // Its limits are its own (seccomp lets it only read them): another process of
                    // its uid lowered them (prlimit), and it would never accept again. Ending the
                    // session gives port 80 back to the app.
                    logger.error("the validation proxy's descriptor limit was lowered by another process; the proxy exits")
                    outcome = .failed
                    return taken
                }
                if code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM {
                    // The listener stays readable: accepting again at once would spin. Pause for a
                    // moment (or until a connection closes).
                    pauseListening()
                    listenersResumeAt = now + 100
                    if now - lastDescriptorWarning > 10_000 {
                        lastDescriptorWarning = now
                        logger.warning("the validation proxy cannot accept: \(errnoText(code)); pausing its listeners")
                    }
                }
                return taken
            }
            taken += 1
            // Steered connections keep their destination: the socket's own address is the
            // original one. Anything else came to the proxy port directly, which nobody may use.
            var original = le_endpoint()
            guard le_local_endpoint(fd, &original) == 0, original.port == redirectedPort else {
                ProxyCounters.bump(counters.refused)
                closeDescriptor(fd)
                continue
            }
            steeredTaken &+= 1
            Fault.reach("proxy-accepted")
            let source = SourceAddress(peer)
            let held = perSource[source, default: 0]
            if held >= options.maxConnectionsPerSource {
                ProxyCounters.bump(counters.refused)
                closeDescriptor(fd)
                if now - lastSourceWarning > 10_000 {
                    lastSourceWarning = now
                    logger.notice(
                        "closing new connections from \(peer.addressText): it holds \(held) (--max-connections-per-source)")
                }
                continue
            }
            perSource[source] = held + 1
            if original.isLinkLocal && original.scope_id == 0 {
                // A link-local address is reached only through its interface: the one that has it.
                original.scope_id = Self.interface(holding: original) ?? peer.scope_id
            }
            let relay = Relay(client: fd, peer: peer, original: original, maxHeadBytes: options.maxHeadBytes)
            relay.deadline = now + options.headTimeout.milliseconds
            if freeSlots.isEmpty {
                relay.slot = slots.count
                slots.append(relay)
            } else {
                relay.slot = freeSlots.removeLast()
                slots[relay.slot] = relay
            }
            generation &+= 1
            relay.generation = generation
            ProxyCounters.bump(counters.connections)
            ProxyCounters.bump(counters.accepted)
            if draining { applyDrain(relay) }
            _ = le_epoll_ctl(epoll, Epoll.add, fd, Epoll.readable, relay.tag(upstream: false))
            relay.clientInterest = Epoll.readable
        }
        return taken
    }

    /// The index of the interface that has `address`, or nil when no interface of this host has it.
    private static func interface(holding address: le_endpoint) -> UInt32? {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0 else { return nil }
        defer { freeifaddrs(list) }
        let wanted = address.addressBytes
        var item = list
        while let current = item {
            item = current.pointee.ifa_next
            guard let a = current.pointee.ifa_addr, Int32(a.pointee.sa_family) == address.family else { continue }
            let bytes =
                address.family == AF_INET6
                ? a.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { s in withUnsafeBytes(of: s.pointee.sin6_addr) { Array($0) } }
                : a.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { s in withUnsafeBytes(of: s.pointee.sin_addr) { Array($0) } }
            // The scope of a link-local address is its interface's index, as getifaddrs reports it
            // (no if_nametoindex: its ioctl socket is not the proxy's to make).
            if bytes == wanted {
                guard address.family == AF_INET6 else { return 0 }
                return a.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_scope_id }
            }
        }
        return nil
    }

    private static func isLocal(_ address: le_endpoint) -> Bool { interface(holding: address) != nil }

    private func pauseListening() {
        guard listening else { return }
        listening = false
        for fd in listeners { _ = le_epoll_ctl(epoll, Epoll.modify, fd, 0, 0) }
    }

    private func resumeListening() {
        guard !listening, !listeners.isEmpty else { return }
        listening = true
        for (i, fd) in listeners.enumerated() {
            _ = le_epoll_ctl(epoll, Epoll.modify, fd, Epoll.readable, EventTag.listener(i).rawValue)
        }
    }

    // MARK: Events

    private func handle(_ r: Relay, upstreamSide: Bool, events: UInt32) {
        if upstreamSide && r.upstream < 0 { return }  // an event for an upstream closed earlier in this batch
        if events & Epoll.error != 0 && !(upstreamSide && r.connecting) {
            close(r)  // a reset: neither side can be served further
            return
        }
        let readable = events & (Epoll.readable | Epoll.hangUp | Epoll.error) != 0
        let writable = events & (Epoll.writable | Epoll.error | Epoll.hangUp) != 0
        if upstreamSide {
            if r.connecting {
                guard writable else { return }
                let error = le_socket_error(r.upstream)
                if error != 0 {
                    upstreamFailed(r, error)
                    return
                }
                r.connecting = false
                if r.checksListenerOwner && !listenerOwnerAllowed(r) {
                    if !r.closed { updateInterest(r) }
                    return
                }
            }
            if writable, !r.toUpstream.isEmpty { flushUpstream(r) }
            if r.closed { return }
            if readable, r.upstreamInterest & Epoll.readable != 0 { readUpstream(r) }
        } else {
            if writable, !r.toClient.isEmpty { flushClient(r) }
            if r.closed { return }
            if readable, r.clientInterest & Epoll.readable != 0 { readClient(r) }
        }
        if r.closed { return }
        // A hang-up is reported whether asked for or not: a side that is not being read (its
        // bytes wait for the other side) leaves epoll until it is read again.
        if events & Epoll.hangUp != 0 {
            let interest = upstreamSide ? r.upstreamInterest : r.clientInterest
            if interest & Epoll.readable == 0 {
                _ = le_epoll_ctl(epoll, Epoll.delete, upstreamSide ? r.upstream : r.client, 0, 0)
                if upstreamSide { r.upstreamInterest = Relay.parked } else { r.clientInterest = Relay.parked }
            }
        }
        updateInterest(r)
    }

    private func readClient(_ r: Relay) {
        let n = recv(r.client, scratch, Self.readSize, 0)
        if n > 0 {
            ProxyCounters.bump(counters.bytesFromClients, by: n)
            if r.lingering { return }  // after the last response: read and drop
            fromClient(r, UnsafeRawBufferPointer(start: scratch, count: n))
            flushRun()
            return
        }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        // EOF or error from the client.
        r.clientEOF = true
        if n < 0 || r.lingering || r.upstream < 0 {
            close(r)
            return
        }
        if r.phase == .reading && r.requests.state == .head && r.requests.isHolding {
            // A head cut short: nothing sensible can reach the app.
            close(r)
            return
        }
        // Half-close: pass it on once what is buffered for the app is written.
        if r.toUpstream.isEmpty && !r.connecting { shutdownUpstreamWrite(r) }
        if r.upstreamEOF && r.toClient.isEmpty { close(r) }
    }

    private func readUpstream(_ r: Relay) {
        let n = recv(r.upstream, scratch, Self.readSize, 0)
        if n > 0 {
            fromUpstream(r, UnsafeRawBufferPointer(start: scratch, count: n))
            flushRun()
            return
        }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        r.upstreamEOF = true
        if n < 0 {
            close(r)
            return
        }
        if r.responseEndsAtClose { responseComplete(r) }
        if r.closed { return }
        if r.opaque {
            // A half-close of an opaque stream: the client may still send.
            if r.toClient.isEmpty { shutdownClientWrite(r) }
            if r.clientEOF && r.toClient.isEmpty { close(r) }
            return
        }
        // The app closed: the client gets what was sent, then the end of the connection.
        finishClient(r)
    }

    // MARK: Client to app: request framing

    private func tooLarge(_ r: Relay) {
        localResponse(r, status: 431, "Request Header Fields Too Large", body: "request head too large\n")
    }

    private func fromClient(_ r: Relay, _ bytes: UnsafeRawBufferPointer) {
        if r.preambleSettled {
            fromClientFramed(r, bytes)
            return
        }
        // A connection's first bytes: a PROXY header from a load balancer in front, or HTTP.
        if r.preambleHeld.isEmpty {
            if settlePreamble(r, bytes) { return }
            r.preambleHeld.append(contentsOf: bytes)
        } else {
            // Taken out while they are framed (nothing is held then), put back if more are needed.
            r.preambleHeld.append(contentsOf: bytes)
            let held = r.preambleHeld
            r.preambleHeld = []
            if !held.withUnsafeBytes({ settlePreamble(r, $0) }) { r.preambleHeld = held }
        }
    }

    /// Reads a connection's first bytes for a PROXY header; false when more are needed to tell.
    private func settlePreamble(_ r: Relay, _ bytes: UnsafeRawBufferPointer) -> Bool {
        switch ProxyHeader.scan(bytes, limit: options.maxHeadBytes) {
        case .needMore:
            return false
        case .notAHeader:
            r.preambleSettled = true
            fromClientFramed(r, bytes)
        case .header(let length):
            r.preambleSettled = true
            r.proxyHeader = Array(bytes[..<length])
            if length < bytes.count { fromClientFramed(r, UnsafeRawBufferPointer(rebasing: bytes[length...])) }
        case .invalid(let why):
            // What an app expecting the header does with a broken one: the connection ends.
            r.preambleSettled = true
            logger.debug("closing a connection from \(r.peer.addressText): \(why)")
            ProxyCounters.bump(counters.proxyErrors)
            close(r)
        }
        return true
    }

    private func fromClientFramed(_ r: Relay, _ bytes: UnsafeRawBufferPointer) {
        var i = 0
        while i < bytes.count && !r.closed {
            switch r.phase {
            case .tunnelRequested:
                // Until the app says yes (2xx to CONNECT, 101 to an upgrade) what follows is
                // another request, to be parsed like any: held here, the client not read meanwhile.
                r.pending.append(bytes.baseAddress! + i, bytes.count - i)
                return
            case .stopped, .paused:
                // Requests after the last one this connection carries are not taken (the client
                // retries them elsewhere, as after any server close).
                return
            case .reading:
                break
            }
            if r.requests.state == .head {
                if draining && !r.mayStartRequest() {
                    // Draining: one request at a time; hold what came until the response is done.
                    let rest = bytes.count - i
                    if r.requests.heldCount + r.pending.count + rest <= options.maxHeadBytes {
                        r.pending.append(bytes.baseAddress! + i, rest)
                        r.phase = .paused
                    } else {
                        // More than a head's worth: those bytes are not taken, and nothing after
                        // them could be framed; the connection ends after the response in flight
                        // (the client retries the rest elsewhere, as after any server close).
                        r.phase = .stopped
                        r.closeAfterResponse = true
                    }
                    return
                }
                if !r.requests.isHolding && r.outstanding.isEmpty && r.upstream >= 0 {
                    r.deadline = now + options.headTimeout.milliseconds
                }
            }
            switch r.requests.step(bytes, at: i) {
            case .head(let range):
                requestHead(r, UnsafeRawBufferPointer(rebasing: bytes[range]))
                i = range.upperBound
            case .assembledHead(let upTo):
                let head = r.requests.takeHead()
                head.withUnsafeBytes { requestHead(r, $0) }
                i = upTo
            case .body(let range, _), .passThrough(let range):
                toUpstream(r, bytes.baseAddress! + range.lowerBound, range.count)
                i = range.upperBound
            case .held, .end:
                return
            case .headTooLarge:
                tooLarge(r)
                return
            case .brokenChunks:
                close(r)  // the app would see a broken body: nothing sensible to relay
                return
            }
        }
    }

    private func requestHead(_ r: Relay, _ raw: UnsafeRawBufferPointer) {
        let skip = HTTPHead.leadingEmptyLines(raw)
        let head = UnsafeRawBufferPointer(rebasing: raw[skip...])
        let request: HTTPHead.Request
        do { request = try HTTPHead.parseRequest(head) } catch {
            localResponse(r, status: 400, "Bad Request", body: "\(error)\n")
            return
        }
        if r.upstream < 0 {
            guard route(r, request) else { return }
        }
        r.deadline = .max
        if r.toChallengeServer {
            // The challenge source gets this one request and nothing after it (a pipelined
            // request to whatever listens there, or a second token): it and the client are told
            // the connection closes after the answer.
            let closing = HTTPHead.rewrite(head, dropping: ["connection", "keep-alive"], adding: ["Connection: close"])
            if options.unknownChallenges == .app, case .port = options.challenge {
                // Kept for the app, should nothing listen on the challenge port: as the app gets
                // any request (with --forwarded, the client's headers replaced), closing after it.
                let forApp = options.forwarded ? forwardedHead(r, head) : Array(head)
                r.challengeRequest = forApp.withUnsafeBytes {
                    HTTPHead.rewrite($0, dropping: ["connection", "keep-alive"], adding: ["Connection: close"])
                }
            }
            if r.upstream >= 0 { closing.withUnsafeBytes { toUpstream(r, $0.baseAddress!, $0.count) } }
            r.requestSentAsLast(request)
            ProxyCounters.bump(counters.requests)
            return
        }
        if r.upstream >= 0, options.forwarded {
            let rewritten = forwardedHead(r, head)
            rewritten.withUnsafeBytes { toUpstream(r, $0.baseAddress!, $0.count) }
        } else {
            toUpstream(r, raw.baseAddress!, raw.count)
        }
        r.requestSent(request)
        ProxyCounters.bump(counters.requests)
    }

    /// The head with the client's forwarding headers replaced by the proxy's (--forwarded).
    private func forwardedHead(_ r: Relay, _ head: UnsafeRawBufferPointer) -> [UInt8] {
        let proto = "http"
        let address = r.peer.addressText
        let forwardedFor = r.peer.family == AF_INET6 ? "\"[\(address)]\"" : address
        return HTTPHead.rewrite(
            head, dropping: ["x-forwarded-for", "x-forwarded-proto", "forwarded"],
            adding: [
                "X-Forwarded-For: \(address)", "X-Forwarded-Proto: \(proto)", "Forwarded: for=\(forwardedFor);proto=\(proto)",
            ])
    }

    /// Decides where a connection goes from its first request; false when it was answered here.
    private func route(_ r: Relay, _ request: HTTPHead.Request) -> Bool {
        guard let token = request.challengeToken else { return connectApp(r) }
        ProxyCounters.bump(counters.challenges)
        let head = request.method == .head
        // Nothing but a well-formed token goes to a challenge source: `../../admin` names no file
        // and reaches no challenge server. With --unknown-challenges app it goes where it would go
        // without le-redirect, the app.
        guard ChallengeToken.isValid(token) else { return unknownChallenge(r, token: token, headOnly: head) }
        guard request.body == .none else {
            localResponse(r, status: 400, "Bad Request", body: "a challenge request has no body\n")
            return false
        }
        if let keyAuthorization = tokens.keyAuthorization(for: token) {
            localResponse(r, status: 200, "OK", body: keyAuthorization, headOnly: head)
            return false
        }
        switch options.challenge {
        case .memory:
            break
        case .stateless(let thumbprint):
            // Only a plain token of a bounded length is echoed (RFC 8555 8.3: an echoed token
            // must never become markup), as text/plain that no browser sniffs.
            if ChallengeToken.isValidStateless(token) {
                localResponse(r, status: 200, "OK", body: token + "." + thumbprint, headOnly: head)
                return false
            }
        case .webroot:
            if let body = webroot?.keyAuthorization(for: token) {
                localResponse(r, status: 200, "OK", body: body, headOnly: head)
                return false
            }
        case .port(let port):
            var loopback = le_endpoint()
            loopback.family = AF_INET
            loopback.addr.0 = 127
            loopback.addr.3 = 1
            loopback.port = port
            r.toChallengeServer = true
            r.checksListenerOwner = true
            return connectUpstream(r, to: loopback, proxyProtocol: false)
        case .url:
            r.toChallengeServer = true
            r.checksListenerOwner = challengeListenerIsLocal
            return connectUpstream(r, to: challengeUpstream!, proxyProtocol: false)
        }
        return unknownChallenge(r, token: token, headOnly: head)
    }

    /// A challenge the session cannot answer: the app's (`--unknown-challenges app`), or a 404.
    private func unknownChallenge(_ r: Relay, token: String, headOnly: Bool) -> Bool {
        if options.unknownChallenges == .app {
            logger.debug("a challenge for a token this session does not hold goes to the app")
            return connectApp(r)
        }
        localResponse(r, status: 404, "Not Found", body: "unknown ACME challenge token\n", headOnly: headOnly)
        return false
    }

    /// Connects to where the connection was going, with the PROXY header it came with (from a
    /// load balancer in front) or, with --proxy-protocol v2, the proxy's own in its place.
    private func connectApp(_ r: Relay) -> Bool {
        guard connectUpstream(r, to: r.original, proxyProtocol: options.proxyProtocol) else { return false }
        if !options.proxyProtocol && !r.proxyHeader.isEmpty {
            r.proxyHeader.withUnsafeBytes { toUpstream(r, $0.baseAddress!, $0.count) }
        }
        return true
    }

    /// Nothing listens on the challenge port (with --unknown-challenges app): the challenge is
    /// not one this session's ACME client holds (a certificate renewed through --webroot or the
    /// nginx plugin in the same `certbot renew`), and goes to the app instead. True when it did.
    private func challengeToApp(_ r: Relay, _ error: Int32) -> Bool {
        guard error == ECONNREFUSED, r.toChallengeServer, options.unknownChallenges == .app,
            case .port = options.challenge, !r.challengeRequest.isEmpty, r.bytesToClient == 0
        else { return false }
        closeUpstream(r)
        r.toChallengeServer = false
        r.checksListenerOwner = false
        // Still this one request only: the client is told so and the connection ends after it.
        r.oneRequest = true
        r.closeAfterResponse = true
        logger.debug("nothing listens on the challenge port: the challenge goes to the app")
        guard connectApp(r) else { return true }
        let request = r.challengeRequest
        r.challengeRequest = []
        request.withUnsafeBytes { toUpstream(r, $0.baseAddress!, $0.count) }
        return true
    }

    private func connectUpstream(_ r: Relay, to destination: le_endpoint, proxyProtocol: Bool) -> Bool {
        var to = destination
        var inProgress: Int32 = 0
        let fd = le_tcp_connect(&to, &inProgress)
        guard fd >= 0 else {
            let code = errno
            logger.debug("connecting to \(to.addressText):\(to.port): \(errnoText(code))")
            if code == ECONNREFUSED, r.toChallengeServer, options.unknownChallenges == .app, case .port = options.challenge {
                logger.debug("nothing listens on the challenge port: the challenge goes to the app")
                r.toChallengeServer = false
                r.checksListenerOwner = false
                return connectApp(r)
            }
            localResponse(r, status: 502, "Bad Gateway", body: Self.refusedText(r))
            return false
        }
        r.upstream = fd
        r.connecting = inProgress != 0
        _ = le_epoll_ctl(epoll, Epoll.add, fd, Epoll.writable, r.tag(upstream: true))
        r.upstreamInterest = Epoll.writable
        if !r.connecting && r.checksListenerOwner && !listenerOwnerAllowed(r) { return false }
        if proxyProtocol {
            let header = ProxyProtocol.v2Header(source: r.peer, destination: r.original)
            header.withUnsafeBytes { toUpstream(r, $0.baseAddress!, $0.count) }
        }
        return true
    }

    /// Whether the socket a challenge connection reached belongs to root or a --challenge-owner
    /// user; if not, the client gets 503 and the upstream is closed before a byte was sent. Asked
    /// of the connection itself (the accepted socket carries its listener's owner), so a listener
    /// swapped between a check and the connect cannot slip in.
    private func listenerOwnerAllowed(_ r: Relay) -> Bool {
        r.checksListenerOwner = false
        var local = le_endpoint()
        var remote = le_endpoint()
        var uid: UInt32?
        if le_local_endpoint(r.upstream, &local) == 0, le_peer_endpoint(r.upstream, &remote) == 0 {
            do throws(NetlinkError) {
                if diag == nil { diag = try NetlinkSocket(bus: NETLINK_SOCK_DIAG) }
                let family = UInt8(remote.family)
                let found = try SocketDiagnostics.lookup(
                    diag!, family: family, local: remote.addressBytes, localPort: remote.port, remote: local.addressBytes,
                    remotePort: local.port)
                if let found, found.ownerIsKnown {
                    uid = found.uid
                } else {
                    // Not yet a full socket (its handshake is still being completed): its listener's owner.
                    let listeners = try SocketDiagnostics.listeners(diag!, port: remote.port).filter(\.ownerIsKnown)
                    uid = listeners.first { !listenerOwners.allows($0.uid) }?.uid ?? listeners.first?.uid
                }
            } catch {
                logger.warning("looking up the owner of the challenge listener \(remote.addressText):\(remote.port): \(errnoText(error.errno))")
            }
        }
        if let uid, listenerOwners.allows(uid) { return true }
        ProxyCounters.bump(counters.proxyErrors)
        let owner = uid.map { "uid \($0)" } ?? "an unknown user"
        logger.warning(
            "a challenge was not forwarded: the listener on \(remote.addressText):\(remote.port) belongs to \(owner), not \(listenerOwners.text) (--challenge-owner names others); answered 503")
        closeUpstream(r)
        localResponse(r, status: 503, "Service Unavailable", body: "the challenge server is not the ACME client's\n")
        return false
    }

    private func upstreamFailed(_ r: Relay, _ error: Int32) {
        logger.debug("connecting to the upstream: \(errnoText(error))")
        if challengeToApp(r, error) { return }
        if !r.responseStopped && r.responses.state == .head && r.outstanding.count == 1 && r.toClient.isEmpty
            && r.bytesToClient == 0
        {
            closeUpstream(r)
            localResponse(r, status: 502, "Bad Gateway", body: Self.refusedText(r))
        } else {
            close(r)
        }
    }

    private static func refusedText(_ r: Relay) -> String {
        r.toChallengeServer
            ? "the ACME client's challenge server did not accept the connection\n"
            : "the application did not accept the connection\n"
    }

    // MARK: App to client: response framing

    private func fromUpstream(_ r: Relay, _ bytes: UnsafeRawBufferPointer) {
        var i = 0
        while i < bytes.count && !r.closed && !r.responseStopped {
            switch r.responses.step(bytes, at: i) {
            case .head(let range):
                responseHead(r, UnsafeRawBufferPointer(rebasing: bytes[range]))
                i = range.upperBound
            case .assembledHead(let upTo):
                let head = r.responses.takeHead()
                head.withUnsafeBytes { responseHead(r, $0) }
                i = upTo
            case .body(let range, let ends):
                toClient(r, bytes.baseAddress! + range.lowerBound, range.count)
                i = range.upperBound
                if ends { responseComplete(r) }
            case .passThrough(let range):
                toClient(r, bytes.baseAddress! + range.lowerBound, range.count)
                i = range.upperBound
            case .held, .end:
                return
            case .headTooLarge, .brokenChunks:
                // Not HTTP we can follow: from here on, bytes pass as they are (what was held first).
                let held = r.responses.takeHead()
                stopFollowing(r)
                held.withUnsafeBytes { if $0.count > 0 { toClient(r, $0.baseAddress!, $0.count) } }
            }
        }
    }

    /// The app's bytes are not HTTP the proxy can follow: without knowing where its responses
    /// end, neither side can be framed any more, and the connection is an opaque stream from here
    /// on (the drain timeout ends it, like a tunnel's).
    private func stopFollowing(_ r: Relay) {
        let held = r.stopFollowing()
        if draining { r.deadline = drainDeadline }
        held.withUnsafeBytes { if $0.count > 0 { toUpstream(r, $0.baseAddress!, $0.count) } }
    }

    private func responseHead(_ r: Relay, _ head: UnsafeRawBufferPointer) {
        let method = r.outstanding.first ?? .get
        guard let response = try? HTTPHead.parseResponse(head, requestMethod: method) else {
            // Not a response we can follow: from here on, bytes pass as they are.
            stopFollowing(r)
            toClient(r, head.baseAddress!, head.count)
            return
        }
        if response.interim {
            toClient(r, head.baseAddress!, head.count)
            return
        }
        if r.phase == .tunnelRequested && r.outstanding.count == 1
            && (response.status == 101 || (method == .connect && response.status < 300))
        {
            toClient(r, head.baseAddress!, head.count)
            let held = r.tunnelAccepted()
            if draining { r.deadline = drainDeadline }
            held.withUnsafeBytes { if $0.count > 0 { toUpstream(r, $0.baseAddress!, $0.count) } }
            return
        }
        // While draining, the response to the last request this connection will carry says so.
        if (draining || r.toChallengeServer || r.oneRequest) && r.outstanding.count == 1 && r.betweenRequests
            && response.body != .untilClose
        {
            let closing = HTTPHead.rewrite(head, dropping: ["connection", "keep-alive"], adding: ["Connection: close"])
            closing.withUnsafeBytes { toClient(r, $0.baseAddress!, $0.count) }
            r.closeAfterResponse = true
            r.phase = .stopped
        } else {
            toClient(r, head.baseAddress!, head.count)
            if !response.keepAlive && r.phase == .reading && r.requests.state == .head { r.phase = .stopped }
        }
        if response.body == .none || response.body == .length(0) {
            r.responseBody(.none)
            responseComplete(r)
        } else {
            r.responseBody(response.body)
        }
    }

    private func responseComplete(_ r: Relay) {
        switch r.responseEnded() {
        case .finish:
            finishClient(r)
            return
        case .resume(let held):
            held.withUnsafeBytes { fromClient(r, $0) }
            return
        case .idle:
            break
        }
        if r.outstanding.isEmpty && r.idleBetweenRequests {
            r.deadline = now + (draining ? Self.drainIdleGrace : options.idleTimeout.milliseconds)
        } else if r.outstanding.isEmpty && r.phase == .reading && r.requests.state == .head && r.requests.isHolding {
            // Part of the next head came while this response was in flight: the head timeout
            // runs for it from now (a client must not stall half a head behind a pipelined one).
            r.deadline = now + options.headTimeout.milliseconds
        }
    }

    // MARK: Local answers and closing

    private func localResponse(_ r: Relay, status: Int, _ reason: String, body: String, headOnly: Bool = false) {
        if status >= 400 && status != 404 { ProxyCounters.bump(counters.proxyErrors) }
        let bodyBytes = Array(body.utf8)
        var text = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: text/plain\r\nContent-Length: \(bodyBytes.count)\r\n"
        text += "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        var bytes = Array(text.utf8)
        if !headOnly { bytes += bodyBytes }
        r.stopBothWays()
        closeUpstream(r)
        bytes.withUnsafeBytes { toClient(r, $0.baseAddress!, $0.count) }
        finishClient(r)
    }

    /// The client gets no more: once its bytes are written, its write side is shut and whatever
    /// it still sends is read and dropped for a moment (no reset), then the connection closes.
    private func finishClient(_ r: Relay) {
        flushRun()
        closeUpstream(r)
        r.lingering = true
        r.deadline = now + Self.lingerTime
        if r.toClient.isEmpty { shutdownClientWrite(r) }
        if r.clientEOF && r.toClient.isEmpty { close(r) }
    }

    private func closeUpstream(_ r: Relay) {
        guard r.upstream >= 0 else { return }
        closeDescriptor(r.upstream)  // closing also takes it out of epoll
        r.upstream = -1
        r.connecting = false
        r.upstreamInterest = 0
        r.toUpstream.release()
    }

    private func shutdownClientWrite(_ r: Relay) {
        guard !r.clientWriteShut else { return }
        r.clientWriteShut = true
        _ = shutdown(r.client, Int32(SHUT_WR))
    }

    private func shutdownUpstreamWrite(_ r: Relay) {
        guard !r.upstreamWriteShut, r.upstream >= 0 else { return }
        r.upstreamWriteShut = true
        _ = shutdown(r.upstream, Int32(SHUT_WR))
    }

    private func close(_ r: Relay) {
        guard !r.closed else { return }
        if let pending = pendingRun, pending.relay === r { pendingRun = nil }
        r.closed = true
        closeDescriptor(r.client)
        if r.upstream >= 0 { closeDescriptor(r.upstream) }
        r.toClient.release()
        r.toUpstream.release()
        slots[r.slot] = nil
        freeSlots.append(r.slot)
        let source = SourceAddress(r.peer)
        if let held = perSource[source], held > 1 { perSource[source] = held - 1 } else { perSource[source] = nil }
        ProxyCounters.bump(counters.connections, by: -1)
        if !listening && !draining { resumeListening() }
    }

    // MARK: Writing, with back-pressure

    /// Bytes read into `scratch` and passed on unchanged are sent in one piece per read (a head
    /// and the body after it are contiguous there): `run` is the piece not yet sent.
    private var pendingRun: (relay: Relay, upstream: Bool, start: UnsafeRawPointer, count: Int)?

    @inline(__always)
    private func deferrable(_ r: Relay, upstream: Bool, _ p: UnsafeRawPointer, _ n: Int) -> Bool {
        guard p >= UnsafeRawPointer(scratch), p + n <= UnsafeRawPointer(scratch) + Self.readSize else {
            flushRun()
            return false
        }
        if let run = pendingRun, run.relay === r, run.upstream == upstream, run.start + run.count == p {
            pendingRun!.count += n
            return true
        }
        flushRun()
        pendingRun = (r, upstream, p, n)
        return true
    }

    private func flushRun() {
        guard let pending = pendingRun else { return }
        pendingRun = nil
        if pending.relay.closed { return }
        if pending.upstream {
            sendUpstream(pending.relay, pending.start, pending.count)
        } else {
            sendClient(pending.relay, pending.start, pending.count)
        }
    }

    private func toUpstream(_ r: Relay, _ p: UnsafeRawPointer, _ n: Int) {
        guard n > 0, r.upstream >= 0 else { return }
        if deferrable(r, upstream: true, p, n) { return }
        sendUpstream(r, p, n)
    }

    private func sendUpstream(_ r: Relay, _ p: UnsafeRawPointer, _ n: Int) {
        guard r.upstream >= 0 else { return }
        if r.connecting {
            r.toUpstream.append(p, n)
        } else if !r.toUpstream.write(p, n, to: r.upstream) {
            close(r)
        }
    }

    private func toClient(_ r: Relay, _ p: UnsafeRawPointer, _ n: Int) {
        guard n > 0 else { return }
        r.bytesToClient &+= n
        ProxyCounters.bump(counters.bytesToClients, by: n)
        if deferrable(r, upstream: false, p, n) { return }
        sendClient(r, p, n)
    }

    private func sendClient(_ r: Relay, _ p: UnsafeRawPointer, _ n: Int) {
        if !r.toClient.write(p, n, to: r.client) { close(r) }
    }

    private func flushUpstream(_ r: Relay) {
        guard r.toUpstream.flush(to: r.upstream) else { return close(r) }
        if r.toUpstream.isEmpty && r.clientEOF { shutdownUpstreamWrite(r) }
    }

    private func flushClient(_ r: Relay) {
        guard r.toClient.flush(to: r.client) else { return close(r) }
        guard r.toClient.isEmpty else { return }
        if r.lingering || r.upstreamEOF { shutdownClientWrite(r) }
        if r.closed { return }
        if r.clientEOF && (r.lingering || r.upstreamEOF) { close(r) }
    }

    /// Reads a side only while what it sent last has been written on (back-pressure).
    private func updateInterest(_ r: Relay) {
        var client: UInt32 = 0
        if !r.clientEOF
            && (r.lingering
                || r.toUpstream.isEmpty && !r.connecting && r.phase == .reading)
        {
            client |= Epoll.readable
        }
        if !r.toClient.isEmpty { client |= Epoll.writable }
        setInterest(r.client, &r.clientInterest, client, tag: r.tag(upstream: false))
        guard r.upstream >= 0 else { return }
        var upstream: UInt32 = 0
        if r.connecting || !r.toUpstream.isEmpty { upstream |= Epoll.writable }
        if !r.connecting && !r.upstreamEOF && r.toClient.isEmpty && !r.responseStopped {
            upstream |= Epoll.readable
        }
        setInterest(r.upstream, &r.upstreamInterest, upstream, tag: r.tag(upstream: true))
    }

    /// Changes what epoll reports for `fd` only when it differs; a parked descriptor (see
    /// `handle`) comes back once there is something to wait for.
    private func setInterest(_ fd: Int32, _ current: inout UInt32, _ desired: UInt32, tag: UInt64) {
        guard desired != current else { return }
        if current == Relay.parked {
            guard desired != 0 else { return }
            _ = le_epoll_ctl(epoll, Epoll.add, fd, desired, tag)
        } else {
            _ = le_epoll_ctl(epoll, Epoll.modify, fd, desired, tag)
        }
        current = desired
    }

    // MARK: Timers and drain

    private func sweep() {
        for case let r? in slots where r.deadline <= now {
            if r.lingering || !draining || r.opaque || r.outstanding.isEmpty {
                close(r)
            }
        }
    }

    private func applyDrain(_ r: Relay) {
        if r.opaque {
            r.deadline = drainDeadline
        } else if r.outstanding.isEmpty && !r.requestBytesHeld && r.upstream >= 0 {
            r.deadline = min(r.deadline, now + Self.drainIdleGrace)
        }
    }
}
