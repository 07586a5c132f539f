/// What `le-redirect deploy haproxy` sends over HAProxy's Runtime API (the stats socket at level
/// admin): `set ssl cert NAME <<` with the PEM HAProxy loads for a `crt` (the full chain, then the
/// private key), then `commit ssl cert NAME`; `abort ssl cert NAME` when either is refused. The
/// I/O is in LERedirect's `HAProxyRuntime`; what is sent and how answers read is here, offline.
public enum HAProxyCertificate {
    /// The PEM HAProxy wants: the certificate chain and the key, every block whole, no empty
    /// line (an empty line ends a `<<` payload on the Runtime API) and no CR.
    public static func pem(fullchain: String, key: String, fullchainPath: String, keyPath: String) throws(LERedirectError) -> String {
        let chain = try blocks(fullchain, path: fullchainPath)
        guard chain.contains(where: { $0.label == "CERTIFICATE" }) else {
            throw LERedirectError(.invalidArgument, "\(fullchainPath): no PEM certificate in it")
        }
        let keys = try blocks(key, path: keyPath).filter { $0.label.hasSuffix("PRIVATE KEY") }
        guard keys.count == 1 else {
            throw LERedirectError(
                .invalidArgument, "\(keyPath): expected one PEM private key, found \(keys.count)")
        }
        return (chain.filter { $0.label == "CERTIFICATE" } + keys).map(\.text).joined(separator: "\n") + "\n"
    }

    struct Block {
        let label: String
        let text: String
    }

    /// The PEM blocks of `text`, each as `-----BEGIN L-----` ... `-----END L-----` with its lines
    /// trimmed; anything between blocks (certbot's and openssl's comments) is left out.
    static func blocks(_ text: String, path: String) throws(LERedirectError) -> [Block] {
        var result: [Block] = []
        var label: String?
        var lines: [String] = []
        for raw in text.split(omittingEmptySubsequences: false, whereSeparator: { $0.isNewline }) {  // "\r\n" is one Character
            let line = trimmed(raw)
            if let open = label {
                if line.isEmpty { continue }
                lines.append(line)
                if line == "-----END \(open)-----" {
                    result.append(Block(label: open, text: lines.joined(separator: "\n")))
                    label = nil
                    lines = []
                } else if line.hasPrefix("-----") {
                    throw LERedirectError(.invalidArgument, "\(path): a PEM block \(open) does not end before \(line)")
                }
            } else if line.hasPrefix("-----BEGIN "), line.hasSuffix("-----") {
                label = String(line.dropFirst(11).dropLast(5))
                lines = [line]
            }
        }
        if let label { throw LERedirectError(.invalidArgument, "\(path): the PEM block \(label) does not end") }
        return result
    }

    static func trimmed(_ text: Substring) -> String {
        let blank: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        guard let first = text.firstIndex(where: { !blank($0) }), let last = text.lastIndex(where: { !blank($0) }) else { return "" }
        return String(text[first...last])
    }

    public static func setCommand(name: String, pem: String) -> String {
        "set ssl cert \(name) <<\n\(pem)\n"
    }

    public static func commitCommand(name: String) -> String { "commit ssl cert \(name)\n" }
    public static func abortCommand(name: String) -> String { "abort ssl cert \(name)\n" }

    /// Whether HAProxy took `set ssl cert` ("Transaction created/updated for certificate ...").
    public static func setSucceeded(_ answer: String) -> Bool { answer.contains("Transaction created") || answer.contains("Transaction updated") }

    /// Whether HAProxy committed ("Committing NAME ... Success!").
    public static func commitSucceeded(_ answer: String) -> Bool { answer.contains("Success!") }

    /// A name HAProxy can be given on one command line: its `crt` path as the configuration names it.
    public static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 4096 && !name.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F || $0 == UInt8(ascii: ";") })
    }
}
