package qupath.lib.gui

/**
 * Test stand-in for QuPath's GUI entry class (not in qupath-core): only getInstance(), non-null as in a running
 * QuPath window, so the scripts take their "show a dialog" path. Used only by the GUI-error test.
 */
class QuPathGUI {
    private static final QuPathGUI INSTANCE = new QuPathGUI()

    static QuPathGUI getInstance() { INSTANCE }
}
