"""Calibration-only English text for the MiniLM harness, written for this project.

These paragraphs only ever feed the calibration split (``lrq_ao.quality.texts.calibration_sentences``); the
evaluation split stays exactly the every-third-sentence slice of ``lrq_ao.quality.corpus``. They cover topics and
registers the main corpus does not (emails, dialogue, instructions, news reports, memories, law, accounting...).

Rules as for ``corpus.py``: every sentence unique, starting with a capital letter and ending with ``.``, ``?`` or
``!``; no abbreviations with a full stop followed by a space (the splitter would cut there). Whitespace inside a
paragraph is normalized before splitting, so paragraphs may be written as triple-quoted blocks.
"""

CALIBRATION_PARAGRAPHS: tuple[str, ...] = (
    # Sailing
    """A small sailing boat can move against the wind, though never straight into it. The sailor zigzags in a
    series of tacks, crossing the wind at an angle on each leg. When the boat turns through the wind, the sail
    flaps loudly for a moment and then fills on the other side. Everyone aboard learns to duck when the boom swings
    across. On a reach, with the wind coming from the side, the boat heels over and picks up speed. Beginners often
    pull the sheet in too tight and wonder why the boat slows down. A telltale of light wool tied to the sail shows
    whether the air is flowing smoothly across both surfaces. Tides matter as much as wind near the coast, and a
    wise skipper plans the passage around them. Fog can roll in within minutes, so a compass and a chart stay on
    board even on a sunny afternoon. At the end of the day the sails are folded, the ropes coiled, and the deck
    rinsed of salt.""",
    # Geology
    """The rocks beneath our feet record a history far longer than anything written by people. Sandstone forms
    when layers of sand are buried, pressed and cemented together over millions of years. Limestone is often made
    of the shells of tiny sea creatures that settled on an ancient ocean floor. When rocks are squeezed and heated
    deep underground, they can turn into marble, slate or schist. A road cutting through a hillside sometimes
    reveals layers tilted at a steep angle, evidence of enormous forces. Geologists read these layers from bottom
    to top, because the oldest usually lie deepest. Fossils help them match rocks of the same age across different
    continents. Earthquakes occur where great plates of the crust grind past one another. Rivers and glaciers wear
    mountains down grain by grain, carrying the pieces to the sea. Even a pebble on a beach may have travelled
    hundreds of kilometres before it came to rest there.""",
    # Accounting
    """Every business, however small, needs to know where its money comes from and where it goes. Double-entry
    bookkeeping records each transaction twice, once as a debit and once as a credit. If the two columns do not
    balance at the end of the month, somebody has made a mistake. A balance sheet shows what a company owns and
    what it owes on a particular day. The income statement, by contrast, describes how much it earned and spent
    over a period of time. Cash flow can be negative even when a firm is profitable on paper, because customers
    may pay late. Auditors check the records to make sure the numbers give a fair picture. Depreciation spreads
    the cost of a machine over the years in which it is used. Many owners dread the end of the tax year, when
    receipts must be found and sorted. A tidy filing system kept throughout the year saves many anxious evenings
    later.""",
    # Childhood memories
    """When I was small, my grandmother lived in a narrow house at the end of a lane lined with chestnut trees. In
    autumn we filled our pockets with shiny conkers and argued about which one was the strongest. Her kitchen
    always smelled of onions and warm milk. She kept a tin of biscuits on the highest shelf, which only made them
    more precious. On rainy afternoons we built forts from blankets and the backs of chairs. My brother insisted
    that a dragon lived under the stairs, and for a whole summer I believed him. We walked to the village shop with
    a handful of coins and spent far too long choosing sweets. The shopkeeper never hurried us, though there was
    often a queue behind. Years later I went back and found the chestnut trees cut down and the house painted
    blue. The lane seemed much shorter than I remembered, as places from childhood always do.""",
    # Urban planning
    """A city is shaped as much by its roads and zoning rules as by its famous buildings. Planners decide where
    houses, shops, factories and parks may be built. Wide streets designed for cars can make a neighbourhood feel
    empty and unsafe for people on foot. Narrow streets with shops at ground level tend to stay lively late into
    the evening. Good public transport lets a city grow without drowning in traffic. When housing is built far
    from jobs, workers spend hours every week commuting. Trees along the pavement cool the air in summer and make
    walking more pleasant. Some cities have turned old railway lines into long, green paths for cyclists and
    walkers. Residents often resist new buildings near their homes, even when they agree that more homes are
    needed. The hardest part of planning is balancing the wishes of people who live there now with those who will
    arrive later.""",
    # Music theory
    """Western music divides the octave into twelve equal steps called semitones. A major scale follows a fixed
    pattern of whole and half steps, which gives it a bright, settled sound. Minor scales lower some of those
    notes and often sound sad or serious to our ears. A chord is three or more notes played together, usually
    stacked in thirds. The tension of a dominant chord seems to pull the listener back towards home. Composers
    delay that return to create suspense, then resolve it at the end of a phrase. Rhythm is organised into bars,
    and the time signature tells the player how many beats each bar contains. Syncopation places accents where
    the listener does not expect them. Jazz musicians learn the rules of harmony thoroughly so that they can bend
    them on purpose. In the end, theory describes what musicians already do, rather than dictating what they must
    do.""",
    # Insects
    """Insects outnumber every other group of animals on land. Each one has six legs, a body in three parts, and
    usually a pair of antennae. Ants live in colonies where thousands of sisters share the work of gathering food
    and raising young. A honeybee tells her nestmates where to find flowers by dancing on the honeycomb.
    Caterpillars spend their lives eating, then seal themselves in a case and reappear as butterflies. Dragonflies
    hunt other insects in mid-air and can fly backwards as well as forwards. Some beetles are so small that they
    could walk through the eye of a needle. Crickets sing by rubbing one wing against a ridge on the other. Without
    insects to pollinate them, many fruits and vegetables would never form. Farmers are learning to protect the
    wild insects that live along the edges of their fields.""",
    # Railway history
    """The first public railways carried coal from mines to rivers and ports. Early locomotives were slow, noisy
    and prone to breaking down, and many people doubted that they would ever replace horses. Within a few decades,
    however, iron rails had spread across whole countries. Towns that gained a station grew quickly, while those
    that were bypassed often declined. Railway companies needed a single agreed time, so clocks across a nation
    were set to the same hour. Navvies dug cuttings and tunnels by hand, and many of them died in accidents.
    Passengers in the cheapest carriages sat on wooden benches, exposed to smoke and rain. The arrival of cheap
    travel let city families visit the seaside for the first time. Steam gave way to diesel and electric traction
    in the twentieth century. Today volunteers keep old engines running on heritage lines, and children still wave
    as they pass.""",
    # Law
    """A contract is a promise that the law will enforce. For most contracts, there must be an offer, an
    acceptance, and something of value exchanged between the parties. A written agreement is easier to prove, but
    many spoken agreements are binding too. When one side fails to keep its promise, the other may ask a court for
    damages. Judges try to put the injured party in the position it would have been in had the contract been
    performed. Criminal law is different, because the state prosecutes offences against the public as a whole.
    Anyone accused of a crime is presumed innocent until the prosecution proves guilt. The burden of proof in a
    criminal trial is higher than in a civil dispute. Lawyers spend much of their time reading earlier decisions to
    see how similar cases were resolved. Plain language in legal documents helps ordinary people understand their
    rights.""",
    # Hospital night shift
    """The hospital corridor is quiet at three in the morning, but it is never empty. A nurse checks each patient
    on the ward, reading the monitors and adjusting a drip. An elderly man cannot sleep and asks for a cup of tea,
    and she finds time to make one. In the emergency department, a young doctor stitches a cut hand while the
    patient tells a long story about a broken glass. Blood samples travel through pneumatic tubes to a laboratory
    that works all night. The pharmacist on call answers questions about doses and drug interactions. Sometimes
    the night passes slowly, and sometimes three ambulances arrive within ten minutes. Staff drink strong coffee
    and eat whatever is left in the vending machine. At seven the day team arrives, and the night shift hands over
    every detail, patient by patient. Then they walk out into the morning light, tired but relieved.""",
    # Football
    """Football needs little more than a ball and a patch of open ground. Children play it in streets, schoolyards
    and fields all over the world, using jumpers or bags as goalposts. A professional match lasts ninety minutes,
    plus whatever time the referee adds for stoppages. The offside rule confuses newcomers, yet it keeps attackers
    from simply waiting beside the goal. A well-timed pass can split a defence more effectively than any amount of
    running. Goalkeepers are the only players allowed to handle the ball, and only inside their own area. Fans
    sing for their team through rain, wind and long losing seasons. A penalty shootout is cruel, because a whole
    season may hang on a single kick. Coaches study video of their opponents to find weaknesses in their shape.
    Still, the sport keeps its charm because a small team can sometimes beat a giant.""",
    # An email to a colleague
    """Hi Sam, thanks for sending the draft report yesterday afternoon. I read it on the train this morning and
    think the structure works well. The second section could be shorter, since most of it repeats what we said in
    the introduction. Could you add a chart showing the monthly figures side by side? I also noticed that two of
    the totals in the appendix do not match the summary table. It is probably a rounding issue, but we should fix
    it before the client sees it. I am free on Thursday after lunch if you would like to go through the changes
    together. Otherwise, send me a revised version by Friday and I will review it over the weekend. Please also
    copy Priya, because she asked to see the final numbers. Thanks again for all the work on this, it is in good
    shape.""",
    # A reply about a delayed order
    """Dear customer, thank you for your message about your recent order. We are sorry that the parcel has not
    arrived on the date we promised. Our warehouse received a larger number of orders than expected last week, and
    some deliveries were delayed. Your parcel left our building on Tuesday and is now with the courier. The
    tracking page should update within the next day or two. If it has not reached you by the end of next week,
    please reply to this email and we will send a replacement at no cost. We have also added a small discount to
    your account for your next purchase. We value your patience and hope the item is worth the wait. Kind regards,
    the customer service team.""",
    # A conversation at a train station
    """Excuse me, is this the platform for the train to the coast? It was, but they moved it to platform six about
    ten minutes ago. Oh no, I would never have heard that announcement over the noise. Do you know if it is running
    on time? The board says it is four minutes late, so you should be fine if you hurry. Is platform six over the
    bridge or through the tunnel? Take the stairs on your left and follow the signs, it is the last one. Thank you
    so much, you have saved my whole afternoon. No problem at all, I get lost in this station every week. Have a
    good trip, and I hope the weather stays dry for you!""",
    # Instructions: changing a bicycle tyre
    """First, shift the chain onto the smallest rear cog so the wheel is easier to remove. Open the brake quick
    release if your bike has rim brakes. Loosen the axle and lift the wheel out of the frame. Let any remaining air
    out of the inner tube by pressing the valve. Slide a tyre lever under the edge of the tyre and hook it onto a
    spoke. Work a second lever around the rim until one side of the tyre comes free. Pull out the old tube and run
    your fingers carefully around the inside of the tyre to find whatever caused the puncture. Put a little air
    into the new tube so that it holds its shape. Tuck it inside the tyre, starting at the valve, and push the tyre
    bead back over the rim with your thumbs. Pump it up to the pressure printed on the sidewall and refit the
    wheel.""",
    # News report: a flood
    """Heavy rain overnight caused a river to burst its banks in the north of the region on Sunday. Emergency
    services evacuated more than two hundred homes in the early hours of the morning. No injuries were reported,
    though several roads remain closed and a number of cars were swept away. Local schools will stay shut on
    Monday while the water recedes. Residents described waking to find water rising through the floorboards. A
    spokesperson for the council said temporary shelter had been arranged in the town sports hall. Forecasters
    expect drier weather later in the week, but warn that the ground is already saturated. Engineers will inspect
    the flood defences once it is safe to do so. The last flood of a similar size struck the area eleven years
    ago.""",
    # News report: a museum reopening
    """The city museum reopened its doors this weekend after a renovation that took almost three years. Visitors
    queued around the block on Saturday morning to see the new galleries. The building now has a glass roof over
    its central courtyard, which was previously open to the weather. Curators have rearranged the collection so
    that objects from different centuries sit side by side. A new gallery for children allows them to handle
    copies of ancient tools and pottery. The director said the aim was to make the museum feel less like a
    storeroom and more like a conversation. Entry remains free, although donations are welcome. Some long-standing
    visitors said they missed the old dark wooden cases. The museum expects to welcome half a million people in its
    first year.""",
    # Cheese making
    """Cheese begins as milk, warmed gently in a large vat. The cheesemaker adds a culture of bacteria that turns
    some of the milk sugar into acid. Then comes rennet, which makes the milk set into a soft, trembling curd. The
    curd is cut into small pieces with long wire knives, releasing the liquid whey. For hard cheeses, the curds are
    stirred, heated further and pressed into moulds. Salt is rubbed onto the surface or the whole wheel is soaked in
    brine. Maturing takes weeks, months or even years in a cool, damp cellar. Each wheel is turned regularly so that
    the moisture spreads evenly. Blue cheeses are pierced with needles to let air reach the mould inside. Two
    dairies using the same recipe will still produce cheeses that taste different.""",
    # Beekeeping
    """A beekeeper opens the hive slowly, using a little smoke to keep the bees calm. The frames inside are heavy
    with honey in late summer. A healthy colony has one queen, thousands of workers and, in warm months, a few
    hundred drones. The queen can lay well over a thousand eggs on a good day. Workers build wax comb from glands on
    their bodies, shaping each cell into a neat hexagon. When a colony grows too crowded, half of it may leave with
    the old queen in a swarm. A swarm hanging from a branch looks alarming but is usually quite gentle. Beekeepers
    must watch for mites, which weaken bees and spread disease. Honey is harvested by slicing the wax caps off the
    comb and spinning the frames. Enough must always be left behind for the bees to survive the winter.""",
    # Pottery
    """Throwing a pot on a wheel looks easy until you try it yourself. The clay must first be wedged to push out
    air bubbles that could crack it in the kiln. It has to sit exactly in the centre of the wheel, or it will wobble
    and collapse. Wet hands guide the spinning clay upward into a cylinder. A slight change of pressure can make
    the wall thinner, thicker, wider or narrower. Once shaped, the pot dries slowly until it is firm enough to
    trim. The first firing turns the clay into a hard but porous material called bisque. Glaze is a thin coating of
    glassy minerals that melts in a second, hotter firing. Colours often change dramatically in the kiln, which
    keeps potters humble. Many of them keep their failures on a shelf as a reminder of what went wrong.""",
    # Glaciers
    """A glacier is a river of ice that moves under its own weight. Snow that survives the summer is slowly
    compressed into dense, blue ice. Near the surface the ice is brittle and cracks into deep crevasses. Deeper
    down it flows like very thick toffee, creeping downhill a few metres each year. Glaciers carve wide valleys with
    steep sides and flat floors. They also carry boulders far from their source and drop them in unlikely places.
    Walking on a glacier requires ropes, crampons and a guide who knows the route. Many glaciers have retreated a
    long way during the last century. Scientists measure their thickness with radar and track their movement with
    satellites. Meltwater from glaciers feeds rivers that millions of people depend on during dry seasons.""",
    # Caves
    """Most caves form in limestone, which slowly dissolves in slightly acidic water. Over thousands of years,
    small cracks widen into passages and great underground halls. Water dripping from the ceiling leaves behind
    tiny amounts of mineral. Stalactites hang down from the roof, and stalagmites rise up from the floor to meet
    them. Caves stay at nearly the same temperature all year round. Bats roost in them by the thousand and fly out
    at dusk to feed. Some caves contain lakes so clear that divers seem to float in air. Explorers squeeze through
    narrow gaps with lamps on their helmets and carefully mark their route. Early people painted animals on cave
    walls by the light of flickering fires. Those paintings have survived because the air inside barely changes.""",
    # Deserts
    """Deserts are defined by how little rain they receive, not by how hot they are. Some of the largest deserts
    are cold, with long winters and thin snow. In hot deserts, the temperature can fall sharply once the sun goes
    down. Sand dunes move slowly as wind lifts grains from one side and drops them on the other. Yet much of the
    desert surface is gravel, rock or dry clay rather than sand. Plants survive by storing water in their stems or
    sending roots deep into the ground. After a rare storm, seeds that have waited for years burst into flower
    within days. Many desert animals rest in burrows during the day and come out at night. Travellers in the past
    crossed the desert in long caravans, moving from one well to the next. A single mistake in navigation could
    cost them their lives.""",
    # Forests
    """A walk through an old forest feels different from a walk through a young plantation. The trees are of many
    ages, and fallen trunks lie slowly rotting on the ground. That dead wood feeds fungi, beetles and countless
    other small creatures. Beneath the soil, fine threads of fungi link the roots of neighbouring trees. Light
    reaches the forest floor in shifting patches, and seedlings grow towards it. When an old tree falls, it opens a
    gap where younger trees race upward. Woodpeckers drill holes that later become homes for owls and bats. In
    autumn, the floor is covered in leaves that will become next year's soil. Forests store huge amounts of carbon
    in their wood and in the ground. Protecting an old forest is far easier than trying to grow a new one.""",
    # Mushrooms
    """The mushroom we see above ground is only the fruit of a much larger organism. Most of a fungus lives hidden
    in soil or wood as a web of thin threads. Mushrooms release spores by the million, and the wind carries them
    away. Some fungi help trees by trading minerals for sugar through their roots. Others break down dead leaves
    and logs, returning nutrients to the soil. Picking wild mushrooms to eat is risky, because some deadly species
    look like harmless ones. Experienced foragers check the gills, the stem, the smell and even the colour of the
    spores. Yeast is a fungus too, and without it we would have neither bread nor beer. Penicillin, one of the first
    antibiotics, was found in a common mould. There are probably many thousands of fungi that nobody has named
    yet.""",
    # Knitting
    """Knitting turns a single long strand of yarn into fabric, one loop at a time. A beginner starts by casting
    on a row of stitches onto one needle. The knit stitch and the purl stitch are mirror images of each other. By
    combining them in different patterns, a knitter can make ribbing, cables or textured squares. Dropped stitches
    leave a ladder running down the work, which can be fixed with a crochet hook. Wool is warm even when damp,
    while cotton is cool and soft for summer garments. Counting rows carefully is the secret to making two sleeves
    the same length. Many knitters find the rhythm of the needles calming after a busy day. A hand-knitted scarf
    takes many hours, which is why it makes such a personal gift. Old sweaters can be unravelled and the yarn used
    again.""",
    # Tea
    """Tea comes from the leaves of a single species of evergreen shrub. Green, black and oolong teas differ mainly
    in how the leaves are processed after picking. For green tea, the leaves are heated quickly to stop them from
    darkening. Black tea leaves are rolled and left to oxidise until they turn a deep brown. The best leaves are
    picked by hand from the top of each bush. Water that is too hot can make delicate teas taste bitter. In some
    countries tea is served with milk and sugar, while in others that would seem strange. Tea ceremonies turn the
    simple act of making a drink into a slow and careful ritual. Sailing ships once raced each other to bring the
    first tea of the season to market. Today a cup of tea is one of the most common drinks in the world.""",
    # Clocks and timekeeping
    """For most of history, people told the time by the sun. Sundials worked well on clear days but were useless at
    night or under cloud. Water clocks measured time by the steady flow from one vessel into another. Mechanical
    clocks appeared in church towers, striking bells to mark the hours. The pendulum made clocks far more accurate,
    because each swing takes almost exactly the same time. Sailors needed precise clocks to work out their
    longitude at sea. A watchmaker assembles hundreds of tiny parts with tweezers and a magnifying glass. Quartz
    crystals made cheap watches accurate to within seconds a month. Atomic clocks are now so precise that they would
    lose less than a second in millions of years. Even so, many of us still manage to be late for meetings.""",
    # Printing
    """Before printing, every book had to be copied by hand, letter by letter. Printing with movable type let a
    workshop produce hundreds of identical pages in a day. Each letter was cast in metal and set by hand into lines
    and pages. Ink was spread on the type, paper was laid on top, and a heavy press squeezed them together. Books
    became cheaper, and more people had reason to learn to read. Pamphlets spread news and arguments faster than
    any messenger could. Printers had to be careful, because a single misplaced letter would appear in every
    copy. Later, steam-powered presses produced newspapers by the thousand each night. Typewriters and then
    computers put the power of print into ordinary homes and offices. A modern printer still uses ideas that
    began in those early workshops.""",
    # Maps
    """A map is always a simplification, showing some things and leaving others out. Mapmakers must decide how
    to flatten the curved surface of the Earth onto a flat page. Every projection distorts something, whether
    shape, area, distance or direction. Contour lines show the height of the land, and lines drawn close together
    mean a steep slope. Old maps often filled unknown regions with sea monsters or empty space. Surveyors once
    measured the land with chains, compasses and careful triangulation. Today satellites record the position of
    roads and buildings with remarkable accuracy. Yet a paper map still has advantages when the battery of a
    phone runs out. Reading a map well is a skill that improves with practice in the field. A good map tells you
    not only where you are but also what lies ahead.""",
    # First aid
    """If someone collapses, first check that the area is safe for you to approach. Speak to the person loudly
    and gently tap their shoulders to see if they respond. Call for emergency help as early as possible, or ask a
    bystander to do it. If the person is not breathing normally, begin chest compressions in the centre of the
    chest. Push hard and fast, allowing the chest to rise fully between each push. An automated defibrillator
    gives spoken instructions, so anyone can use one. For a minor burn, cool the skin under running water for at
    least twenty minutes. Press firmly on a bleeding wound with a clean cloth and keep the pressure steady. Do not
    give food or drink to someone who may need an operation. A short first aid course can give you the confidence
    to act when it matters.""",
    # Swimming
    """Learning to swim as an adult can feel frightening at first. The most important step is learning to relax
    and trust that the water will hold you up. Breathing is the hardest part, because the face must go under
    between breaths. In front crawl, the swimmer turns the head to one side to breathe without lifting it.
    Breaststroke is slower but lets beginners keep their eyes above the water. A strong kick comes from the hips,
    not from bending the knees. Goggles make a great difference, letting swimmers see where they are going.
    Open water is colder and rougher than a pool, and there is no wall to grab. Lifeguards watch the water
    constantly, looking for anyone who is struggling quietly. Once learned, swimming stays with you for the rest
    of your life.""",
    # Theatre
    """The lights go down, the audience falls silent, and the curtain rises. Behind the scenes, a stage manager
    calls every cue from a small desk in the wings. Actors rehearse for weeks, repeating scenes until the lines
    feel natural. A set must look convincing from the back row while remaining safe to walk on. Costumes are often
    made by hand, and some are changed in less than a minute between scenes. When something goes wrong during a
    performance, the actors carry on as if nothing happened. Small theatres survive on volunteers who paint
    scenery and sell tickets. Comedy depends heavily on timing, and a pause can be funnier than a line. At the end
    the cast bows, and the applause makes the long rehearsals feel worthwhile. The next night they do it all
    again, slightly differently.""",
    # Soap and chemistry at home
    """Soap works because its molecules have two very different ends. One end is attracted to water, while the
    other prefers oil and grease. When you wash your hands, the soap surrounds tiny drops of grease so the water
    can rinse them away. Soap is made by heating fats with a strong alkali, a reaction known for thousands of
    years. Hard water contains minerals that react with soap and leave a grey scum. Vinegar is a weak acid, which
    is why it dissolves the white scale inside kettles. Baking soda releases bubbles of gas when it meets an acid
    in a cake mixture. Bleach should never be mixed with other cleaning products, because dangerous gases can
    form. Reading the label on a bottle is a small habit that prevents many accidents. Much of cleaning is simply
    chemistry that we have learned to do without thinking.""",
    # Moving house
    """Moving house always takes longer than anyone expects. Boxes appear everywhere weeks before the removal van
    arrives. We found letters and photographs we had forgotten we ever owned. Deciding what to keep and what to
    give away led to several long conversations. The heaviest box was full of books that nobody had opened in
    years. On moving day it rained, and the carpet in the hallway suffered for it. The kettle and the mugs were
    packed last so that everyone could have a cup of tea on arrival. That first night we slept on a mattress on
    the floor, surrounded by unopened boxes. It took a month before the new place began to feel like home. Even
    now, we sometimes open a cupboard and wonder why we put the plates there.""",
    # Job interview
    """The interview was scheduled for ten o'clock, and I arrived twenty minutes early. The receptionist offered
    me a glass of water while I waited in a bright room full of plants. Two people from the team met me and
    explained how the day would go. They asked me to describe a project that had not gone to plan. I talked about
    a deadline we had missed and what we had changed afterwards. Then they gave me a short problem to work
    through on a whiteboard. I made a mistake halfway through but noticed it and corrected it myself. At the end
    they asked whether I had any questions for them. I asked what a typical week looked like and how the team
    shared its work. A week later, they called to offer me the job.""",
    # Farming year
    """On a mixed farm, the work changes with every season. In early spring, the fields are ploughed and harrowed
    once the soil is dry enough. Lambs are born, often at night and in the worst weather. Seeds go into the ground
    as soon as the danger of frost has passed. Summer brings long days of cutting hay and watching the sky for
    rain. The grain harvest must be brought in quickly, sometimes working late by the light of the tractor. In
    autumn, the animals come down from the hills and the farmer repairs fences and sheds. Winter is quieter but
    still demands feeding, milking and mending broken machines. Prices for crops and milk rise and fall for
    reasons far beyond the farm gate. Farmers talk about the weather not as small talk but as a matter of
    survival.""",
    # Rivers
    """A river begins as a trickle high in the hills, often from a spring or melting snow. Small streams join
    together, and the river grows wider and slower as it flows downhill. On steep ground it cuts deep valleys and
    tumbles over rocks in rapids. On flat land it winds in wide loops called meanders. Floods spread fine mud
    across the plain, which makes the soil very fertile. That is why so many early farming villages grew up
    beside rivers. People have built mills, bridges, locks and dams along their banks. Dams store water and
    produce power, but they also block the fish that swim upstream to breed. Where the river meets the sea, fresh
    and salt water mix in a rich estuary. Herons stand motionless in the shallows, waiting for a fish to come
    near.""",
    # Lighthouse
    """The lighthouse stands on a rocky point where many ships were once wrecked. Its lamp flashes in a pattern
    that sailors can recognise from miles away. For generations, keepers lived in the tower and climbed its
    spiral stairs every evening. They trimmed wicks, polished the great glass lens and wrote the weather in a log.
    During storms, spray flew higher than the gallery, and the whole tower shook. Families sometimes lived on
    remote islands for months without seeing anyone else. The lens concentrates a small flame into a powerful
    beam. Most lights are now automatic and watched from a control room far away. Some old keepers' cottages
    have become holiday homes for people who want peace and quiet. The light still turns each night, as it has
    for more than a century.""",
    # Learning a language
    """Learning a new language as an adult takes patience and a certain willingness to look foolish. At first,
    even ordering a coffee requires careful planning. Listening is often harder than speaking, because native
    speakers talk quickly and join words together. Grammar books explain the rules, but conversation is where
    they finally make sense. Many learners keep a small notebook of new words and phrases. Watching films with
    subtitles helps the ear grow used to the rhythm of the language. Mistakes are not failures but a normal part
    of the process. One day you notice that you have understood a whole conversation without translating it in
    your head. Dreaming in the new language is a sign that it has taken root. The reward is not only words but a
    new way of seeing the world.""",
    # Recycling
    """Recycling only works if materials are sorted correctly before they reach the plant. A greasy pizza box can
    spoil a whole load of clean paper. Glass can be melted and reshaped again and again without losing quality.
    Aluminium cans are especially valuable, because recycling them uses far less energy than making new metal.
    Many plastics, by contrast, can be recycled only once or twice before they degrade. Some towns collect food
    waste separately and turn it into compost or gas. Reducing what we buy in the first place matters more than
    recycling what we throw away. Repairing a broken chair or a torn coat keeps it out of the bin for years.
    Second-hand shops give furniture and clothes a new life with a new owner. Small habits, repeated by millions
    of people, add up to a real difference.""",
    # Airport
    """Airports are small cities that never quite sleep. Before dawn, cleaners and caterers are already at work
    preparing the first flights. Passengers queue at security, emptying their pockets and removing their belts.
    Signs overhead announce departures, delays and gate changes in several languages. Behind the scenes, bags
    travel along kilometres of conveyor belts to reach the right aircraft. Ground crews refuel planes, load cargo
    and check the tyres between flights. In the control tower, controllers speak calmly to pilots in a language
    full of numbers. A single storm can throw the whole day's schedule into confusion. Tired travellers sleep on
    benches with their coats as pillows. And at the arrivals gate, families wait with flowers and handwritten
    signs.""",
    # Dentist
    """Nobody looks forward to a visit to the dentist, but regular checks prevent bigger problems. The dentist
    looks at each tooth in turn, probing gently for soft spots. X-rays reveal decay between teeth that the eye
    cannot see. Sugar feeds bacteria that produce acid, and the acid slowly dissolves tooth enamel. Brushing twice
    a day and cleaning between the teeth keeps that process in check. A small cavity can be filled quickly, while
    a neglected one may need a root canal. Hygienists scrape away hard deposits that brushing alone cannot remove.
    Modern anaesthetics make most treatments painless, though the sound of the drill is still unpleasant. Children
    who have good experiences at the dentist are less anxious as adults. A bright smile is usually the result of
    many boring evenings with a toothbrush.""",
    # Veterinary clinic
    """The waiting room of the veterinary clinic is full of nervous animals and their even more nervous owners. A
    puppy tugs at its lead, eager to sniff everything. An old cat sits in a basket, glaring at the world through
    the bars. The vet examines each animal gently, feeling for lumps and listening to its heart. Vaccines protect
    pets from diseases that were once common and often fatal. Some patients need surgery, and the clinic has a
    small operating room at the back. Farm vets drive long distances to treat cattle, sheep and horses in muddy
    fields. Animals cannot describe their symptoms, so vets rely on careful observation. Telling an owner that a
    beloved pet cannot be saved is the hardest part of the job. Most days, though, end with a wagging tail and a
    grateful family.""",
    # Winter evening
    """The snow began falling just after lunch and did not stop until dark. By evening, the garden had
    disappeared under a smooth white blanket. We lit the stove and gathered in the one warm room of the house.
    Someone made soup from the vegetables left at the bottom of the basket. Outside, the street was completely
    silent, without a single car. The children pressed their noses to the window, hoping school would be closed
    tomorrow. We played cards by lamplight and argued happily about the rules. An owl called from the trees
    beyond the wall. Before bed, I stepped outside and heard my own breath in the frozen air. In the morning the
    sky was clear and the snow sparkled in the sun.""",
    # Traffic and roads
    """Traffic jams often appear without any obvious cause. When one driver brakes suddenly, the cars behind brake
    harder, and a wave of stopping moves backward along the road. Adding new lanes tends to attract more cars
    until the road is full again. Roundabouts keep traffic moving and reduce the number of serious crashes at
    junctions. Speed bumps and narrow streets encourage drivers to slow down near schools. Buses move more people
    than cars in the same space, which is why many cities give them their own lanes. Traffic lights are timed so
    that a driver at the right speed meets a series of green lights. Potholes form when water seeps into cracks
    and freezes during winter. Road workers usually repair them at night to avoid disrupting the daytime flow.
    For many people, the daily journey to work is the most stressful part of the day.""",
    # Cryptography
    """People have hidden messages from their enemies for as long as there has been writing. A simple cipher
    replaces each letter with another one a fixed number of places along the alphabet. Such codes are easy to
    break by counting which letters appear most often. During wars, codebreakers worked day and night to read
    the messages of the other side. Modern encryption relies on mathematical problems that are extremely hard to
    solve without a secret key. When you buy something online, your browser and the shop agree on a key without
    ever sending it openly. A strong password is long, unpredictable and not used anywhere else. Many security
    breaches happen not because the mathematics fails but because people are tricked. Keeping software up to
    date closes holes that attackers already know about. Security, in the end, is a habit more than a product.""",
    # Prime numbers
    """A prime number can be divided evenly only by one and by itself. The first few primes are two, three, five,
    seven and eleven. Every whole number larger than one can be written as a product of primes in exactly one way.
    The ancient Greeks already knew that there is no largest prime. One simple proof multiplies a list of primes
    together, adds one, and shows that the result must have a new prime factor. Primes become rarer as numbers grow,
    but they never stop appearing. Mathematicians still cannot say for certain whether there are infinitely many
    pairs of primes that differ by two. Computers have found primes with millions of digits. Large primes are the
    foundation of many systems that keep online payments secure. Some people find a quiet beauty in their
    irregular pattern.""",
    # Radio
    """Radio waves travel at the speed of light and pass through walls and clouds. Early radio sets were large
    wooden cabinets, and families gathered around them in the evening. News, music and plays reached homes that
    had never heard a live orchestra. During storms at sea, radio let sinking ships call for help. Amateur
    operators talk to each other across continents using homemade aerials. A radio station sends its signal on a
    particular frequency, and the receiver tunes to it. Static crackles when the signal is weak or the weather is
    bad. Many people still prefer the radio in the car or the kitchen because it leaves their eyes free. Late at
    night, a distant station can sometimes be heard far beyond its usual range. The voice of a familiar presenter
    can feel like the company of a friend.""",
    # Post office
    """The village post office was also a shop, a meeting place and a source of news. Letters arrived each morning
    in a red van and were sorted on a long wooden table. The postman knew every family by name and most of their
    dogs as well. Stamps have carried pictures of kings, queens, flowers, birds and famous buildings. Collectors
    pay large sums for stamps that were printed with mistakes. Before the telephone, a letter might take weeks to
    cross an ocean. Soldiers far from home waited eagerly for the mail to arrive. Today most letters are bills or
    advertisements, but parcels have grown in number. A handwritten card on a birthday still feels more personal
    than any message on a screen. Some people keep boxes of old letters as a record of their lives.""",
    # Marathon
    """Running a marathon begins months before the race, with a slow build-up of weekly distance. Long runs at the
    weekend teach the body to burn fat as well as sugar. Runners learn which shoes suit them and which socks cause
    blisters. Tapering in the final weeks lets the muscles recover before the big day. On race morning, thousands
    of people gather at the start, stretching and shuffling to stay warm. The first miles feel easy, and the
    danger is starting too fast. Around the thirtieth kilometre, many runners hit a wall of sudden exhaustion.
    Crowds along the route shout encouragement to complete strangers. Crossing the finish line brings tears,
    laughter and a medal that suddenly feels very precious. The next day, walking down the stairs is a challenge of
    its own.""",
    # Fishing
    """Fishing teaches patience more than almost any other pastime. An angler might sit for hours by a lake
    without a single bite. The early morning is often best, when the water is calm and mist hangs over it. Choosing
    the right bait depends on the kind of fish and the season. A sudden tug on the line sets the heart racing.
    Playing a large fish means letting it run and slowly tiring it out. Many anglers release their catch, holding
    the fish gently in the water until it swims away. Commercial fleets, by contrast, haul enormous nets far out
    at sea. When too many fish are taken, the population may collapse and take decades to recover. Rules on
    catch limits and net sizes try to keep the oceans productive for the future.""",
    # A letter to a friend abroad
    """Dear Ana, it has been far too long since I last wrote, and I am sorry for the silence. The spring here has
    been wet, but the cherry tree outside the kitchen is in full blossom. I started a new job in March and I am
    still learning everybody's names. My sister had a baby boy last month, and he already has very strong opinions
    about sleep. I think of our trip to the mountains often, especially the night the tent blew down. Are you still
    playing the cello in that little orchestra? I would love to visit you in the autumn if you have space for a
    guest. Tell me about your city, your work and whether you ever found a bakery as good as the one near the old
    flat. Write back when you can, even if it is only a few lines. With love, as always.""",
    # Urban wildlife
    """Foxes trot along city pavements at night as if they own them. Pigeons descend from cliff-dwelling birds and
    treat tall buildings as artificial cliffs. Peregrine falcons have followed them, nesting on cathedrals and
    office towers. Gardens, parks and railway banks form a green network through which animals move. Hedgehogs
    need small holes in fences to pass from one garden to the next. Rats thrive wherever food is left out, and
    they are remarkably clever at finding it. Bats hunt insects around street lamps on summer evenings. Some birds
    in noisy cities sing at a higher pitch so that they can be heard over traffic. Ponds in parks attract frogs,
    dragonflies and the occasional heron. A city can be surprisingly wild if you look closely.""",
    # Carpentry
    """A carpenter measures twice and cuts once, because wood cannot be stretched. The grain of the wood decides
    how it should be planed and which way it is likely to split. Sharp tools are safer than blunt ones, since they
    need less force and slip less often. Joints such as the dovetail hold pieces together without nails or screws.
    Glue is surprisingly strong when the surfaces fit closely. Wood shrinks and swells with the seasons, so a good
    table top is allowed to move. Sanding by hand through finer and finer paper leaves a surface smooth as silk.
    Oil brings out the colour of the grain and protects it from spills. A well-made chair can outlast the person
    who built it by centuries. The smell of fresh shavings fills the workshop at the end of the day.""",
    # Plumbing instructions
    """Before repairing a dripping tap, turn off the water supply under the sink or at the main valve. Open the tap
    fully to let any water left in the pipe drain away. Put the plug in the sink so that small parts cannot fall
    down the drain. Remove the decorative cap and unscrew the handle carefully. Underneath you will find a valve or
    a cartridge, depending on the type of tap. Take the old washer or cartridge to a hardware shop to find an exact
    match. Wrap the threads with a little sealing tape before you reassemble the parts. Tighten everything firmly
    but not so hard that you crack the fittings. Turn the water back on slowly and check for leaks around the base.
    If the drip continues, the seat of the valve may be worn and need a professional.""",
    # Sleep
    """We spend roughly a third of our lives asleep, yet scientists are still learning why. During sleep the brain
    sorts the memories of the day, keeping some and discarding others. Sleep moves through cycles, each lasting
    about an hour and a half. Vivid dreams happen mostly in the stage when the eyes move rapidly beneath the lids.
    Teenagers naturally fall asleep later and struggle with early school starts. Bright screens late in the
    evening can delay the feeling of tiredness. A cool, dark and quiet room helps most people sleep more deeply.
    Missing sleep for a few nights makes people irritable, forgetful and clumsy. Long naps in the afternoon may
    make it harder to sleep at night. Most adults feel their best after seven to nine hours.""",
    # Insurance
    """Insurance spreads the cost of rare disasters across many people who pay a small amount each year. A house
    fire would ruin most families, but a premium is affordable. Insurers study the past to estimate how likely each
    kind of loss is. Drivers with a history of accidents pay more, because they are more likely to claim again.
    The small print of a policy explains what is covered and what is not. Floods, for example, are often excluded
    unless they are named explicitly. When something goes wrong, the insured person files a claim with evidence of
    the damage. An assessor may visit to inspect the loss before any money is paid. Some people only read their
    policy after they need it, which is usually too late. Comparing policies once a year can save a surprising
    amount of money.""",
    # Elections and local government
    """On polling day, a school hall is turned into a voting station with booths made of plywood. Volunteers check
    names on the register and hand out ballot papers. Voters mark their choice in private and fold the paper before
    dropping it into a sealed box. After the polls close, the boxes are driven to a counting centre. Counters sort
    the papers into piles by candidate while observers from every side watch closely. A recount may be requested
    if the result is very close. The local council decides matters such as rubbish collection, libraries and
    planning permission. Its meetings are usually open to the public, though few people attend. Councillors
    often spend their evenings answering letters about broken street lights. Democracy at this level is slow,
    patient and rarely glamorous.""",
    # Volunteering at a food bank
    """Every Saturday morning, a small group of volunteers opens the doors of the community food bank. Donations
    arrive in boxes and bags from supermarkets, churches and schools. Tins are checked for dates and sorted onto
    shelves by type. Families who come in are greeted warmly and offered a cup of tea. Each parcel is put together
    to last a household several days. Volunteers learn to listen without judging, since anyone can fall on hard
    times. Fresh fruit and vegetables are always in short supply. Before the holidays, the shelves empty faster
    than they can be filled. Many volunteers say they gain as much from the work as they give. The goal, they
    often add, is a day when the food bank is no longer needed.""",
    # Kites
    """Flying a kite needs a steady breeze and plenty of open space away from trees and power lines. The wind
    pushes against the tilted face of the kite and lifts it upward. A tail adds drag at the bottom and keeps the
    kite from spinning. Letting the line out slowly allows the kite to climb into stronger winds higher up. If the
    wind drops, a quick pull on the line can keep it aloft. Some festivals fill the sky with kites shaped like
    fish, dragons and birds. Stunt kites have two lines and can loop, dive and hover under skilled hands. In some
    places, people compete by trying to cut each other's lines. Kites were once used to lift measuring
    instruments into the sky. On a windy beach, a simple paper kite can keep a child happy for hours.""",
    # Bees' enemies and garden pests: slugs
    """Slugs come out on damp evenings and can strip a row of lettuce overnight. They leave shiny trails that
    glitter in the morning sun. Gardeners try beer traps, copper tape and night patrols with a torch. Thrushes and
    hedgehogs eat large numbers of them, so a garden that welcomes wildlife has fewer slugs. Slugs also do useful
    work, breaking down dead plants and fallen leaves. Most species prefer rotting matter to fresh seedlings.
    Raising young plants indoors until they are sturdy gives them a better chance. Watering in the morning rather
    than the evening leaves the surface drier at night. A gardener learns to accept a certain amount of damage.
    Perfect leaves are not worth a garden without birds.""",
    # Mathematics in everyday life
    """Mathematics hides in many everyday tasks that do not feel like sums at all. Doubling a recipe for guests
    means multiplying every ingredient, including the salt. Working out a tip in a restaurant is a quick exercise
    in percentages. Comparing the price per kilogram of two packets reveals which one is really cheaper. Planning
    a journey means adding times and allowing for delays. Loans and savings grow through compound interest, which
    is easy to underestimate. A carpet fitter calculates areas, while a painter estimates how many litres a wall
    will need. Probability explains why a lottery ticket is almost never worth buying. Sports fans argue about
    averages and statistics for hours. Comfort with numbers makes many small decisions easier and cheaper.""",
    # Poetry in prose
    """The morning came in grey and slow, as if it had not slept well either. Rain tapped the window with the
    patience of an old friend who knows the door will open. On the table, the coffee cooled beside a letter I had
    not yet read. Somewhere a radio played a song I half remembered from a summer long ago. The street below was
    a river of umbrellas, black and red and blue. A child jumped into every puddle, and her mother had given up
    objecting. I thought of all the mornings that had looked exactly like this one. Then the clouds broke, and a
    thin bar of light fell across the floor. The letter, when I finally opened it, was only good news. Some days
    turn out kinder than they begin.""",
    # The sea at night, prose
    """At night the harbour smells of diesel, salt and drying nets. The boats knock softly against each other at
    their moorings. A single lamp burns in the window of the harbourmaster's office. Beyond the wall, the open sea
    breathes in long, slow swells. Fishermen prepare to leave before dawn, moving quietly so as not to wake the
    town. Their lights slide out past the breakwater and vanish one by one. On the quay, a cat waits hopefully
    for scraps. The tide creeps up the stone steps, covering them one at a time. By morning the gulls will be
    screaming over the returning catch. For now, there is only the hush of water and the blink of the lighthouse.""",
    # Volcano of ideas: brainstorming at work
    """The team gathered in the meeting room with a large pad of paper and a pile of coloured pens. The rule for
    the first half hour was simple: no idea could be criticised. Someone suggested running the whole service from
    a van that travelled between towns. Another person wanted to give away the basic product and charge for
    support. The wall soon disappeared under sticky notes in four colours. After a short break, they grouped
    similar ideas together and voted with small dots. Three proposals clearly had the most support. Each was
    assigned to a pair of people, who would test it with real customers. Nobody expected all three to work, and
    that was fine. The best outcome of the day was that everyone had been heard.""",
    # Cooking a curry, instructions
    """Start by warming a little oil in a heavy pan over a medium heat. Add chopped onion and cook it slowly until
    it is soft and golden, which takes at least ten minutes. Stir in crushed garlic and grated ginger and let them
    sizzle for a minute. Add the ground spices and fry them briefly so that their flavour opens up. Tip in a tin
    of tomatoes and simmer until the sauce thickens. Add diced vegetables or chickpeas and enough water to cover
    them. Cover the pan and let everything cook gently for twenty minutes. Taste the sauce and adjust the salt,
    acidity and heat. A handful of fresh coriander stirred in at the end brightens the whole dish. Serve it with
    rice or warm flatbread, and expect the leftovers to taste even better tomorrow.""",
    # Weather forecast style
    """Tomorrow will start cloudy across most areas, with patchy drizzle near western coasts. The rain should clear
    eastwards by late morning, leaving bright spells in the afternoon. Temperatures will be close to average for
    the time of year. Winds will be light at first but strengthening along exposed coasts by evening. Overnight,
    clear skies in sheltered valleys may allow a touch of frost. Thursday looks unsettled, with a band of heavier
    rain crossing the country. Some of the showers could turn thundery in the south. The weekend is likely to be
    drier and calmer, though mist may linger in the mornings. Anyone planning to be on the hills should take
    warm layers and waterproofs. The longer range outlook suggests a colder spell arriving next week.""",
    # Stars and navigation
    """Long before satellites, travellers found their way by the stars. In the northern hemisphere, one bright star
    stays almost fixed above the pole while the others wheel around it. Sailors measured its height above the
    horizon to estimate how far north they were. In the south, a small cross of stars helps point the way instead.
    Island navigators in the Pacific memorised the rising points of dozens of stars. They also read the swell of
    the ocean, the colour of the water and the flight of birds. A cloudy night could leave a ship uncertain of its
    position for days. Instruments of brass and glass made these measurements more precise over time. Even today,
    navy officers still learn to use a sextant in case electronic systems fail. There is something reassuring
    about finding your way by the same lights your ancestors used.""",
    # Geology field trip
    """Our field trip began at a quarry on the edge of town, where the rock face showed layers of grey and cream.
    The lecturer handed out hand lenses and asked us to describe the grains. Some layers were full of tiny shell
    fragments, pointing to a warm, shallow sea. Higher up, the rock changed to a coarse red sandstone with curved
    lines. Those lines, she explained, were the fronts of ancient desert dunes. By lunchtime our notebooks were full
    of sketches and our boots of mud. In the afternoon we walked along a stream to find where two kinds of rock met.
    A thin band of clay marked a gap of millions of years in the record. Standing there, it was hard not to feel
    very small. On the bus home, everyone was tired and quietly pleased.""",
    # Accounting for a household budget
    """A household budget starts with a simple list of money coming in and money going out. Rent or mortgage
    payments usually take the largest share. Food, transport and energy follow, and they change from month to
    month. Small regular payments for subscriptions are easy to forget and add up quickly. Setting aside a fixed
    amount for savings at the start of the month works better than saving what is left. An emergency fund covers
    surprises such as a broken boiler or a sudden trip. Credit cards are convenient but costly when the balance is
    not paid off in full. Reviewing the budget together as a family avoids arguments later. Some people use apps,
    while others prefer a notebook and a pencil. What matters is looking honestly at the numbers.""",
    # Sports: tennis
    """Tennis is a game of angles, timing and nerve. The serve is the only shot a player fully controls, and the
    best players use it to win easy points. A rally from the baseline can last dozens of shots before someone makes
    an error. Grass courts are fast and low, while clay slows the ball and rewards patience. The scoring system, with
    its love, fifteen and deuce, puzzles anyone new to the sport. A single break of serve can decide a whole set.
    Players talk to themselves between points, sometimes encouraging and sometimes scolding. Line judges have
    largely been replaced by cameras that track the ball precisely. Doubles demands constant communication and a
    good understanding of your partner. Many people play into old age, adapting their game as their legs slow.""",
    # Medicine: vaccines and the immune system
    """The immune system learns to recognise invaders it has met before. White blood cells produce antibodies that
    lock onto particular shapes on the surface of a germ. After an infection, memory cells remain ready to respond
    quickly if the same germ returns. A vaccine teaches this lesson without the danger of the full disease. Some
    vaccines use a weakened germ, while others use only a harmless piece of it. Booster doses remind the immune
    system when its memory begins to fade. When enough people are protected, a disease struggles to spread even to
    those who are not. Side effects such as a sore arm or mild fever usually pass within a day or two. Smallpox,
    once a terrible killer, has been wiped out entirely through vaccination. Research continues into vaccines for
    diseases that still resist them.""",
    # Astronomy: the Moon
    """The Moon always shows the same face to the Earth, because it turns once for every orbit. Its phases come
    from the changing angle between the Sun, the Earth and the Moon. A new moon is invisible, lost in the glare of
    the Sun. Over the following two weeks it grows to a full moon, then shrinks again. The dark patches on its
    surface are ancient plains of cooled lava. Bright craters were punched out by rocks falling from space. With no
    air, the Moon has no weather, and footprints left there could last for ages. Its gravity raises the tides that
    wash up and down our beaches twice a day. The Moon is slowly drifting away from us, a few centimetres each year.
    People have gazed at it and told stories about it for as long as there have been people.""",
)
