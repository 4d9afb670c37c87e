"""SDBFT light consensus among edge agents (SPEC M7 with its safety amendment).

The model, the protocol step by step, the safety and liveness proofs (each
step naming the code that enforces it) and what the protocol does not promise
are in docs/consensus.md; this docstring is the summary.

Modules: `node` (the pure state machine), `messages` (wire format), `signing`
(Signer/Keyring), `contracts` (what a round agrees on), `store` (fsynced
log), `transport` (MQTT), `process` (one node as an OS process), `sim`
(seeded simulator and the PBFT anchor).

Roles and assumptions
    n = K+1 consensus nodes listed, in rotation order, in the regulator-signed
    `meterchain.quorum.Membership`; other microgrids only submit requests.
    Quorum q = n//2 + 1 (more than n/2). Synchronous model: a message between
    correct nodes arrives within delta, and correct nodes open a round within
    delta of each other. Safety and liveness hold with f < n/2 faulty nodes,
    counting Byzantine nodes, crashed nodes, and nodes that lose messages.

Round identity and rotation
    A round is (seq, kind), e.g. (17, "clear") then (18, "settle"); every
    signed statement names market, round, view. The primary of view v of
    round seq is member (seq + v) mod n: k advances after every clearing and
    every settlement, and again on every change of primary. (k is a function
    of the round's identity rather than of history, so nodes never disagree
    on who leads.)

Messages: [statement, sender, signature, attachment], statement =
[tag, market, [seq, kind], view, ref, ...], P-256 signature over it
    req     [.., 0, deposit ref, submitter, body]  a participant's signed bid; a
            member's attaches the requests it held when it opened (relays)
    prop    [.., v, value digest, justification digest]  by the primary; the
            statement is the proposal's header; attaches the value (exact
            signed request set + contract result), the primary's own vote,
            and for v > 0 the justification (below). The *signed header* is
            this message without its attachment.
    vote    [.., v, value digest]  attaches the primary's signed header
    blame   [.., v, primary id]  change-primary request; attaches evidence
            (the wrong proposal's signed header, or two conflicting ones)
    cert    [.., v, digest of certificate]  forwards a certificate: q blames
            (leave view v) or q votes with the signed header (see below)
    status  [.., v+1, lock digest, lock view]  sent on entering view v+1;
            attaches the node's highest vote certificate and its signed header
    final   [.., 0, value digest]  "I treat this value as final"; q of them
            form the finality certificate; the primary attaches its QC (and
            the value when submit-only participants need it)
    sync    [.., v, b"" or digest]  asks for a decided round, or fetches the
            value of (view v, digest)
    value   [.., v, value digest]  answers a fetch: attaches the primary's
            whole signed proposal
Vote and final statements are identical across signers, so they aggregate
into `meterchain.quorum.QuorumCertificate`s.

A round, fault-free
    1. Every node opens the round and broadcasts its signed request, relaying
       the requests it already holds (participants' bids sent ahead).
    2. The primary proposes once it holds every member's request, or 2 delta
       + 1 ms after its open, with the exact request set it used.
    3. A backup checks the proposal (signatures, `contract.check` -- it may
       verify rather than re-execute) and votes with the primary's signed
       header (never the value; a backup that holds only the header fetches
       the value by digest first); a backup votes no (blames) on a fresh
       proposal missing its own request or any request it relayed --
       censorship.
    4. Votes reach everyone; q votes are a vote certificate (QC).
    5. A node treats the value as final when more than 2 delta have passed
       since its own vote, it held votes from all n members by then, it saw
       no conflicting proposal of that primary in that view, and it has not
       left the view. Without all n votes it forwards the QC with the signed
       header and waits one delta more. It then broadcasts `final`; the
       primary's carries the QC (the SPEC's "primary publishes the result
       with a quorum certificate"), and the value for submit-only
       participants.
    6. q finals form the finality certificate (FC): the proof the
       aggregator and late nodes rely on (at least one correct node treated
       the value as final by rule 5).

Timers (delta units; "+1" = 1 ms margins for equal timestamps)
    primary request collection  2 delta + 1 after its open (any fresh value)
    blame when no usable proposal  view 0: 4 delta + 2 after open;
                                   view v > 0: 6 delta + 2 after entering
    finality window             more than 2 delta after own vote (all n votes)
    objection forwarding        +1 delta after forwarding the QC (below)
    blame when not final        3 delta + 2 after own vote (10 delta + 2 for a
                                node that is final but has no FC yet)
    view-change wait            2 delta between leaving a view and entering
                                the next (sending the status); 1 delta for
                                the status of a node that voted in no view
                                above its lock's
    fetch by digest             asked again strictly after 3 delta; answers
                                at most once per delta
    After view (n-1)//2 -- which a round never passes with f < n/2 and delays
    within delta -- the blame timeouts double per view (capped at 64x), so a
    too-small delta still recovers; the 2-delta window and the 2-delta wait
    never grow.

Change of primary
    On a wrong result, a censored request, no proposal or no finality in
    time, or a proof of equivocation (two different signed proposals of one
    primary for one round and view -- every node accepts it), a node
    broadcasts a blame. q blames for view v are a change-primary
    certificate; a node holding one forwards it, stops voting and committing
    in v, waits 2 delta, enters v+1 and broadcasts its status. The new primary
    proposes once it holds q statuses: the value of the highest certified
    lock among them (ties: smallest digest), else a fresh result over every
    request it holds. The proposal carries those q signed statuses and the
    lock's QC; a backup votes for it only if it is justified that way. A
    node can jump to a view with a justified proposal or on a certificate.
    Two signed proposals of one view are relayed (as a blame with both) once
    per view whatever the node's blame state; a decided node answers anyone
    still working on the round (blame, certificate, status, sync) with its
    finality certificate.

Safety and liveness (docs/consensus.md)
    If a correct node h commits B in view v (the smallest such view): no QC
    for anything else exists in v (any correct voter of another value would
    have sent its signed header to h within the 2-delta window); every
    correct node holds B's QC and signed header before any correct status
    for a later view goes out (all n members voted B and the correct votes
    arrive within the 2-delta status wait, or h forwarded the QC one delta
    before committing; named headers are always kept; evidence is always
    relayed); so any q statuses carry B's lock and every later QC is B.
    Every correct node commits within `node.liveness_bound_ms`: 7 delta + 2 ms
    of the round's first open with no faulty node, 27 delta + 6 +
    (f - 1)(20 delta + 4) ms with f >= 1 faulty nodes; the FC follows within
    one more delta. The simulator checks this on every schedule.

Messages per round and what O(n) means
    Fault-free: n requests + 1 proposal + n-1 votes + at most n finals = at
    most 3n MQTT publishes: O(n) publishes on a broker that fans out. Every
    publish reaches every node, so deliveries (point to point) are O(n^2),
    as for PBFT: the safety amendment needs every vote to reach everyone.
    The value itself travels once, in the proposal (n - 1 deliveries, like
    PBFT's pre-prepare); votes and finals carry digests and signed headers.
    O(n) is the fault-free figure; a change of primary adds O(n) publishes
    (blames, certificate forwards, statuses) whose attachments carry O(n)
    signatures each.

Persistence and recovery
    `Persist` records (the round with our votes and lock, written before a
    proposal or vote goes out; later the decision with its certificate) come
    first in the action list, and the transport fsyncs them before
    publishing anything after them. A request is not an acknowledgement and
    is re-signed byte for byte after a crash (RFC 6979), so opening a round
    writes nothing. A restarted node rebuilds from its log; rounds it was in
    are "recovering": it neither votes nor uses the 2-delta rule (it may have
    missed messages) but asks (`sync`) and decides on a finality
    certificate -- which is also why a `final` attestation need not wait for
    the disk. A round whose messages overflowed the pre-open buffer is
    treated the same way. Held messages of rounds not open yet are bounded
    per sender (16 distinct messages per sender and round, de-duplicated), so
    a flooding member only loses its own.

Simulation
    `sim.Simulator` drives nodes deterministically from a seed. Tests run
    most schedules with `signing.HashSigner` (keyed hash, simulator only,
    same interface) and a block with real P-256; the keyring caches
    identical (key, message, signature) checks either way.
"""
